"""Parity of an exported graph with PyTorch: each output within its precision's tolerances (from the variant
registry), and bits/dim on the task's held-out tokens next to PyTorch's, since a raw logit difference alone
misleads (a 1e-3 wobble can be harmless, a small shift can flip a sample)."""

from __future__ import annotations

import math

import numpy as np
import torch

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.devices.variants import Tolerance
from projectable_edge.exporters.onnx_io import check_tokens, load_onnx, tokens_sha256
from projectable_edge.exporters.protocol import ExportableModel
from projectable_edge.exporters.spec import read_spec
from projectable_edge_runtime.graphs.contract import GraphKind, graph_logits, kind_of, rollout, score_logits
from projectable_edge_runtime.graphs.runners import OrtRunner
from projectable_edge_runtime.graphs.scoring import bits_per_dim

BATCH = 64  # sequences per call when scoring


class TorchRunner:
    """The PyTorch reference: runs `model` as the `kind` graph would, numpy in and out. check_parity sets torch's
    threads once around a whole comparison: switching them per call would cost more than the tiny model's step."""

    def __init__(self, model: ExportableModel, kind: GraphKind):
        self.model, self.kind = model.eval(), kind
        self.name = f"pytorch:{type(model).__name__}"
        self.providers = [f"torch {torch.__version__} (eager, CPU)"]
        self.input_names, self.output_names = list(kind.inputs), list(kind.outputs)
        self.input_dtypes = {n: np.dtype(np.int64 if n.startswith("token") else np.float32) for n in kind.inputs}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
        with torch.no_grad():
            outs = (self.model(*args),) if self.kind is GraphKind.SCORING else self.model.decode_step(*args)
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}


def graph_bits(runner, kind: GraphKind, layout, tokens: np.ndarray) -> float:
    """Mean -log2 p(token) over all tokens (all sequences have length T, so the mean of per-image bits/dim),
    of a scoring graph (one pass) or a decode graph (teacher-forced, step by step)."""
    return float(bits_per_dim(graph_logits(runner, kind, layout, tokens, BATCH), tokens).mean())


def _diff(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict:
    if got.shape != ref.shape:
        return {"max_abs": math.inf, "max_rel": math.inf, "ok": False,
                "error": f"shape {list(got.shape)} != PyTorch {list(ref.shape)}"}
    d = np.abs(got.astype(np.float64) - ref)
    bad = ~(d <= tol.atol + tol.rtol * np.abs(ref))  # NaN counts as bad
    # floored at 1e-3 so near-zero entries do not explode it
    rel = d / np.maximum(np.abs(ref), 1e-3)
    return {"max_abs": float(np.nan_to_num(d.max(), nan=math.inf)) if d.size else 0.0,
            "max_rel": float(np.nan_to_num(rel.max(), nan=math.inf)) if d.size else 0.0,
            "ok": not bool(bad.any())}


def _cases(kind: GraphKind, tokens: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Held-out set plus edge cases: batch 1, full length, a single token, a partial prefix."""
    t = tokens.shape[1]
    if kind is GraphKind.SCORING:
        return [("heldout", tokens), ("batch1_full_length", tokens[:1]), ("single_token", tokens[:2, :1]),
                ("prefix", tokens[:3, : max(1, t // 2 + 1)])]
    # decode: every step of a teacher-forced rollout is compared, so past 0 .. T-1 are all covered
    return [("rollout", tokens[:8]), ("batch1_full_length", tokens[:1]), ("first_step_bos", tokens[:2, :1])]


def _outputs(runner, kind: GraphKind, layout, x: np.ndarray) -> dict[str, np.ndarray]:
    if kind is GraphKind.SCORING:
        return {"logits": score_logits(runner, x, BATCH)}
    logits, presents = rollout(runner, layout, x)
    return {"logits": logits, **presents}


def compare_outputs(graph, reference, kind: GraphKind, layout, tokens: np.ndarray,
                    tol: dict[str, Tolerance]) -> tuple[list[dict], dict]:
    """(per-case differences, worst difference per output) of two runners on the same inputs."""
    cases, worst = [], {}
    for case, x in _cases(kind, tokens):
        got, ref = _outputs(graph, kind, layout, x), _outputs(reference, kind, layout, x)
        res = {name: _diff(got[name], ref[name], tol[name]) for name in got}
        cases.append({"case": case, "shape": list(x.shape), "outputs": res})
        for name, r in res.items():
            w = worst.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "ok": True, "worst_case": case,
                                        "atol": tol[name].atol, "rtol": tol[name].rtol})
            if r["max_abs"] >= w["max_abs"]:
                w["worst_case"] = case
            w["max_abs"], w["max_rel"] = max(w["max_abs"], r["max_abs"]), max(w["max_rel"], r["max_rel"])
            w["ok"] = w["ok"] and r["ok"]
    return cases, worst


def _bits(graph, reference, kind, layout, tokens, variant: variants.Variant) -> dict:
    onnx_bits = graph_bits(graph, kind, layout, tokens)
    torch_bits = graph_bits(reference, GraphKind.SCORING, layout, tokens)
    rel = (onnx_bits - torch_bits) / torch_bits
    # fp32 must match both ways; a converted graph may only lose up to its budget
    ok = abs(rel) <= variant.budget_rel if variant is variants.FP32 else rel <= variant.budget_rel
    return {"onnx": onnx_bits, "pytorch": torch_bits, "rel_diff": rel, "budget_rel": variant.budget_rel,
            "ok": bool(ok)}


def _lines(graph: str, precision: str, worst: dict, bits: dict, source: str) -> list[str]:
    lines = [f"{graph} {precision} {name}: max abs {w['max_abs']:.3g}, max rel {w['max_rel']:.3g} "
             f"(atol {w['atol']:g}, rtol {w['rtol']:g}; worst case {w['worst_case']}) "
             f"{'ok' if w['ok'] else 'FAILED'}" for name, w in worst.items()]
    lines.append(f"{graph} {precision} bits/dim: onnx {bits['onnx']:.5f} vs pytorch {bits['pytorch']:.5f} "
                 f"({bits['rel_diff']:+.4%}, budget +{bits['budget_rel']:.2%} on {source} tokens) "
                 f"{'ok' if bits['ok'] else 'FAILED'}")
    return lines


def check_parity(onnx_path, model, tokens: np.ndarray | None = None, *, precision: str = "fp32",
                 tolerances: dict | None = None, raise_on_fail: bool = True, log=None) -> dict:
    """Run the graph in ONNX Runtime and the model in PyTorch on the same inputs and compare; a JSON-ready
    report, or one ProjectableEdgeError naming every failing output."""
    proto = load_onnx(onnx_path)
    kind, spec, cfg = kind_of(i.name for i in proto.graph.input), read_spec(proto, str(onnx_path)), model.cfg
    wrong = [f"{k} {getattr(spec, k)} (the model's {getattr(cfg, k)})" for k in
             ("vocab_size", "block_size", "n_layer", "n_head", "head_dim") if getattr(spec, k) != getattr(cfg, k)]
    if wrong:  # another model's graph: torch would fail on its cache shapes mid-rollout
        raise ProjectableEdgeError(f"{onnx_path} was not exported from this model: it has {', '.join(wrong)}; "
                                   "check it against the model it was exported from")
    source = "heldout"
    if tokens is None:  # no task data given: random in-range tokens still catch export bugs
        tokens, source = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, cfg.block_size)), "random"
    tokens = check_tokens(tokens, cfg.vocab_size, cfg.block_size, "parity tokens")
    variant = variants.get(precision)
    tol = dict(variant.tolerances)
    tol.update({k: v if isinstance(v, Tolerance) else Tolerance(**v) for k, v in (tolerances or {}).items()})
    graph, threads = OrtRunner(onnx_path, threads=1), torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared CPUs: one torch thread is ~40x faster than fighting for two
    try:
        cases, worst = compare_outputs(graph, TorchRunner(model, kind), kind, spec.layout, tokens, tol)
        bits = _bits(graph, TorchRunner(model, GraphKind.SCORING), kind, spec.layout, tokens, variant)
    finally:
        torch.set_num_threads(threads)
    lines = _lines(spec.graph, precision, worst, bits, source)
    for line in lines:
        (log or print)(line)
    failed = [n for n, w in worst.items() if not w["ok"]] + ([] if bits["ok"] else ["bits_per_dim"])
    report = {"graph": spec.graph, "precision": precision, "ok": not failed, "failed": failed,
              "tokens": {"source": source, "n": int(tokens.shape[0]), "seq": int(tokens.shape[1]),
                         "sha256": tokens_sha256(tokens)},
              "outputs": worst, "cases": cases, "bits_per_dim": bits, "lines": lines}
    if failed and raise_on_fail:
        detail = "; ".join(line for line in lines if line.endswith("FAILED"))
        raise ProjectableEdgeError(f"parity check of {onnx_path} failed for {', '.join(failed)}: {detail}. "
                                   "The exported graph does not reproduce the PyTorch model; report this with "
                                   "the model config, or loosen tolerances only if the bits/dim line is fine")
    return report
