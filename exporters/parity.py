"""Parity of an exported graph with PyTorch, Optimum-style, plus the task metric (bits/dim).

Raw element differences alone mislead (a 1e-3 logit wobble can be harmless, a small
shift can flip a sample), so each output has its own tolerance per precision and the
report puts bits/dim of the graph on the task's held-out tokens next to PyTorch's.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from devices.errors import ProjectableEdgeError
from exporters.onnx_io import check_tokens, graph_kind, load_onnx, make_session, tokens_sha256
from exporters.spec import read_spec
from runtime.scoring import bits_per_dim
BATCH = 64  # sequences per ORT call when scoring


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # an element fails when |onnx - torch| > atol + rtol * |torch|


# Per precision and output. fp32 logits: the acceptance bar (1e-4 max abs). Quantized
# graphs are judged mainly on bits/dim; their raw bounds only catch gross breakage.
DEFAULT_TOLERANCES: dict[str, dict[str, Tolerance]] = {
    "fp32": {"logits": Tolerance(1e-4, 0.0), "present_keys": Tolerance(1e-4, 0.0),
             "present_values": Tolerance(1e-4, 0.0)},
    "fp16": {"logits": Tolerance(0.1, 0.02), "present_keys": Tolerance(0.05, 0.02),
             "present_values": Tolerance(0.05, 0.02)},
    "int8": {"logits": Tolerance(1.0, 0.1), "present_keys": Tolerance(0.5, 0.1),
             "present_values": Tolerance(0.5, 0.1)},
}
# Largest relative bits/dim increase over PyTorch's accepted per precision.
BITS_BUDGET = {"fp32": 1e-4, "fp16": 0.005, "int8": 0.03}


def precision_family(precision: str) -> str:
    """'int8-static' / 'int8-dynamic' share the int8 tolerances."""
    return "int8" if precision.startswith("int8") else precision


@contextmanager
def torch_threads(n: int = 1):
    """Tiny models on shared CPUs: one torch thread is ~40x faster than fighting for two."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ----------------------------------------------------------------------------- running graphs


def score_logits(session, tokens: np.ndarray) -> np.ndarray:
    """Scoring graph logits [N, T, V] for tokens [N, T], in chunks of BATCH sequences."""
    return np.concatenate([session.run(["logits"], {"tokens": tokens[i:i + BATCH]})[0]
                           for i in range(0, len(tokens), BATCH)])


def empty_cache(spec, batch: int) -> np.ndarray:
    return np.zeros((spec.n_layer, batch, spec.n_head, 0, spec.head_dim), np.float32)


def decode_rollout(session, spec, tokens: np.ndarray):
    """Teacher-forced decode: feed BOS, tokens[:, :-1]; returns logits [N, T, V] and the last cache."""
    n, t = tokens.shape
    pk, pv = empty_cache(spec, n), empty_cache(spec, n)
    feed = np.concatenate([np.full((n, 1), spec.bos_id, np.int64), tokens[:, :-1]], axis=1)
    steps = []
    for i in range(t):
        logits, pk, pv = session.run(None, {"token": feed[:, i:i + 1], "past_keys": pk, "past_values": pv})
        steps.append(logits)
    return np.stack(steps, axis=1), pk, pv


def torch_decode_rollout(model, tokens: np.ndarray):
    n, t = tokens.shape
    feed = torch.from_numpy(np.concatenate([np.full((n, 1), model.bos_id, np.int64), tokens[:, :-1]], axis=1))
    pk, pv = model.empty_cache(n)
    steps = []
    with torch.no_grad(), torch_threads():
        for i in range(t):
            logits, pk, pv = model.decode_step(feed[:, i:i + 1], pk, pv)
            steps.append(logits.numpy())
    return np.stack(steps, axis=1), pk.numpy(), pv.numpy()


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad(), torch_threads():
        return np.concatenate([model(torch.from_numpy(tokens[i:i + BATCH])).numpy()
                               for i in range(0, len(tokens), BATCH)])


def bits_from_logits(logits: np.ndarray, tokens: np.ndarray) -> float:
    """Mean over all tokens of -log2 p(token), in float64: the runtime's bits/dim, averaged over images.

    Every sequence has the same length T, so the mean of per-image means is the mean over all tokens.
    """
    return float(bits_per_dim(logits, tokens).mean())


def bits_per_dim_onnx(session, tokens: np.ndarray, spec) -> float:
    """bits/dim of a scoring graph (one pass) or a decode graph (teacher-forced, step by step)."""
    if spec.graph == "scoring":
        return bits_from_logits(score_logits(session, tokens), tokens)
    logits = np.concatenate([decode_rollout(session, spec, tokens[i:i + BATCH])[0]
                             for i in range(0, len(tokens), BATCH)])
    return bits_from_logits(logits, tokens)


def bits_per_dim_torch(model, tokens: np.ndarray) -> float:
    return bits_from_logits(torch_logits(model, tokens), tokens)


# ----------------------------------------------------------------------------- comparing


def _diff(got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict:
    if got.shape != ref.shape:
        return {"max_abs": math.inf, "max_rel": math.inf, "ok": False,
                "error": f"shape {list(got.shape)} != PyTorch {list(ref.shape)}"}
    d = np.abs(got.astype(np.float64) - ref)
    bad = ~(d <= tol.atol + tol.rtol * np.abs(ref))  # NaN counts as bad
    # relative to the reference magnitude, floored at 1e-3 so near-zero entries do not explode it
    rel = d / np.maximum(np.abs(ref), 1e-3)
    return {"max_abs": float(np.nan_to_num(d.max(), nan=math.inf)) if d.size else 0.0,
            "max_rel": float(np.nan_to_num(rel.max(), nan=math.inf)) if d.size else 0.0,
            "ok": not bool(bad.any())}


def _cases(kind: str, tokens: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Held-out set plus edge cases: batch 1, full length, a single token, a partial prefix."""
    t = tokens.shape[1]
    if kind == "scoring":
        return [("heldout", tokens), ("batch1_full_length", tokens[:1]), ("single_token", tokens[:2, :1]),
                ("prefix", tokens[:3, : max(1, t // 2 + 1)])]
    # decode: every step of a teacher-forced rollout is compared, so past 0 .. T-1 are all covered
    return [("rollout", tokens[:8]), ("batch1_full_length", tokens[:1]), ("first_step_bos", tokens[:2, :1])]


def check_parity(onnx_path, model, tokens: np.ndarray | None = None, *, precision: str = "fp32",
                 tolerances: dict | None = None, raise_on_fail: bool = True, log=None) -> dict:
    """Run the graph in ONNX Runtime and the model in PyTorch on the same inputs and compare.

    Returns a JSON-ready report (keys: graph, precision, ok, tokens, outputs, cases,
    bits_per_dim, lines); raises one ProjectableEdgeError naming every failing output.
    """
    proto = load_onnx(onnx_path)
    kind = graph_kind(proto)
    spec = read_spec(proto, str(onnx_path))
    cfg = model.cfg
    source = "heldout"
    if tokens is None:  # no task data given: random in-range tokens still catch export bugs
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (16, cfg.block_size))
        source = "random"
    tokens = check_tokens(tokens, cfg.vocab_size, cfg.block_size, "parity tokens")
    fam = precision_family(precision)
    tol = dict(DEFAULT_TOLERANCES[fam])
    for k, v in (tolerances or {}).items():
        tol[k] = v if isinstance(v, Tolerance) else Tolerance(**v)
    session = make_session(onnx_path)

    cases, worst = [], {}
    for case, x in _cases(kind, tokens):
        if kind == "scoring":
            got = {"logits": score_logits(session, x)}
            ref = {"logits": torch_logits(model, x)}
        else:
            g = decode_rollout(session, spec, x)
            r = torch_decode_rollout(model, x)
            got = dict(zip(("logits", "present_keys", "present_values"), g))
            ref = dict(zip(("logits", "present_keys", "present_values"), r))
        res = {name: _diff(got[name], ref[name], tol[name]) for name in got}
        cases.append({"case": case, "shape": list(x.shape), "outputs": res})
        for name, r in res.items():
            w = worst.setdefault(name, {"max_abs": 0.0, "max_rel": 0.0, "ok": True, "worst_case": case})
            if r["max_abs"] >= w["max_abs"]:
                w["worst_case"] = case
            w["max_abs"], w["max_rel"] = max(w["max_abs"], r["max_abs"]), max(w["max_rel"], r["max_rel"])
            w["ok"] = w["ok"] and r["ok"]
    for name, w in worst.items():
        w.update(atol=tol[name].atol, rtol=tol[name].rtol)

    onnx_bits = bits_per_dim_onnx(session, tokens, spec)
    torch_bits = bits_per_dim_torch(model, tokens)
    rel = (onnx_bits - torch_bits) / torch_bits
    # fp32 must match both ways; a quantized graph may only lose up to its budget
    ok = abs(rel) <= BITS_BUDGET[fam] if fam == "fp32" else rel <= BITS_BUDGET[fam]
    bits = {"onnx": onnx_bits, "pytorch": torch_bits, "rel_diff": rel, "budget_rel": BITS_BUDGET[fam],
            "ok": bool(ok)}
    lines = [f"{spec.graph} {precision} {name}: max abs {w['max_abs']:.3g}, max rel {w['max_rel']:.3g} "
             f"(atol {w['atol']:g}, rtol {w['rtol']:g}; worst case {w['worst_case']}) "
             f"{'ok' if w['ok'] else 'FAILED'}" for name, w in worst.items()]
    lines.append(f"{spec.graph} {precision} bits/dim: onnx {onnx_bits:.5f} vs pytorch {torch_bits:.5f} "
                 f"({rel:+.4%}, budget +{BITS_BUDGET[fam]:.2%} on {source} tokens) {'ok' if bits['ok'] else 'FAILED'}")
    for line in lines:
        (log or print)(line)
    failed = [n for n, w in worst.items() if not w["ok"]] + ([] if bits["ok"] else ["bits_per_dim"])
    report = {"graph": spec.graph, "precision": precision, "ok": not failed, "failed": failed,
              "tokens": {"source": source, "n": int(tokens.shape[0]), "seq": int(tokens.shape[1]),
                         "sha256": tokens_sha256(tokens)},
              "outputs": worst, "cases": cases, "bits_per_dim": bits, "lines": lines}
    if failed and raise_on_fail:
        detail = "; ".join(l for l in lines if l.endswith("FAILED"))
        raise ProjectableEdgeError(f"parity check of {onnx_path} failed for {', '.join(failed)}: {detail}. "
                                   "The exported graph does not reproduce the PyTorch model; report this with "
                                   "the model config, or loosen tolerances only if the bits/dim line is fine")
    return report
