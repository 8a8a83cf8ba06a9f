"""ONNX Runtime "compilation": an offline-optimized graph (faster session start-up on the device), the `.ort`
flatbuffer that minimal / mobile builds load, and the required-operators config that lets such a build hold only
this model's kernels. Level 'basic' is portable to any provider; 'extended'/'all' may insert CPU contrib ops. A
decode graph is optimized from its contrib-kernel rebuild (`ort_decode_graph`); the .ort keeps standard ops."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from projectable_edge_runtime.devices.choices import choose
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.onnx_io import consumers, load_onnx
from projectable_edge.exporters.spec import attach_spec, opset_of, read_spec, spec_from_onnx
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.bundle.manifest import file_info
from projectable_edge_runtime.graphs.contract import LAYER_CACHE, per_layer
from projectable_edge_runtime.graphs.runners import OptLevel, OrtRunner, ort_session

REPORT_FILE = "compile_report.json"


@dataclass(frozen=True)
class OrtCompileSettings:
    optimized_level: str = "extended"  # the offline-optimized .onnx for full ONNX Runtime builds
    ort_format_level: str = "basic"  # the .ort for minimal / mobile builds: portable by default
    target: str = "x86-64-cpu"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    fuse_decode: bool = True  # rebuild an fp32 decode graph with contrib kernels before optimizing it

    def __post_init__(self):
        for k in ("optimized_level", "ort_format_level"):
            level = choose(OptLevel, getattr(self, k), f"ONNX Runtime {k}")
            if level is OptLevel.DISABLE:
                raise ProjectableEdgeError(f"{k} 'disable' writes an unoptimized graph; choose basic, extended or all")
            object.__setattr__(self, k, level)

    @classmethod
    def from_profile(cls, profile) -> "OrtCompileSettings":
        return cls(target=profile.name, execution_providers=tuple(profile.execution_providers))

    def to_dict(self) -> dict:
        return {**asdict(self), "optimized_level": str(self.optimized_level),
                "ort_format_level": str(self.ort_format_level), "execution_providers": list(self.execution_providers)}


def _feeds(spec) -> list[dict]:
    """Fixed inputs; for a decode graph batch 1 to 3, an empty, a short and a full past, BOS and other tokens."""
    rng = np.random.default_rng(0)
    if spec.graph == "scoring":
        return [{"tokens": rng.integers(0, spec.vocab_size, (2, spec.block_size)).astype(np.int64)}]
    feeds = []
    for batch, past in ((2, 3), (1, 0), (3, spec.block_size - 1)):
        cache = rng.standard_normal((spec.n_layer, batch, spec.n_head, past, spec.head_dim)).astype(np.float32)
        token = rng.integers(0, spec.vocab_size + 1, (batch, 1)).astype(np.int64)
        token[0] = spec.bos_id
        feeds.append({"token": token, "past_keys": cache, "past_values": cache * 0.5})
    return feeds


def _smoke(candidate, reference: Path, spec) -> float:
    """Max abs difference of a compiled graph's outputs (a path or serialized bytes) from its source's on fixed
    inputs, relative to the output's scale where that exceeds 1; per-layer caches compared layer by layer."""
    got_runner = ort_session(candidate, threads=1, optimization="disable")
    ref_runner = OrtRunner(reference, threads=1)
    layered = any(i.name.startswith(LAYER_CACHE) for i in got_runner.get_inputs())
    names = [o.name for o in got_runner.get_outputs()]
    worst = 0.0
    for feed in _feeds(spec):
        ref = ref_runner.run(feed)
        if layered:
            feed = {"token": feed["token"], **per_layer(feed)}
            ref = {"logits": ref["logits"], **per_layer(ref, "present")}
        got = dict(zip(names, got_runner.run(names, feed)))
        if set(got) != set(ref):
            return float("inf")
        for name, r in ref.items():
            if not np.isfinite(r).all():
                raise ProjectableEdgeError(f"{reference.name} gives non-finite {name} on fixed inputs: the graph is "
                                           "broken; export the model again")
            if got[name].shape != r.shape:
                return float("inf")
            if r.size:  # NaN propagates: a compiled graph that gives NaN disagrees (Python's max would drop it)
                worst = float(np.maximum(worst, np.abs(got[name] - r).max() / max(1.0, float(np.abs(r).max()))))
    return worst


def compile_onnxruntime(onnx_path: str | Path, settings: OrtCompileSettings | dict | None, out_dir: str | Path, *,
                        overwrite: bool = False, log=None) -> tuple[Path, dict]:
    """Write out_dir/{<stem>.optimized.onnx, <stem>.ort, <stem>.required_operators.config, compile_report.json}."""
    settings = OrtCompileSettings(**settings) if isinstance(settings, dict) else settings or OrtCompileSettings()
    src, log = Path(onnx_path), log or (lambda s: None)
    proto = load_onnx(src)
    spec = read_spec(proto, str(src))
    names = {"optimized_onnx": f"{src.stem}.optimized.onnx", "ort_format": f"{src.stem}.ort",
             "required_operators": f"{src.stem}.required_operators.config"}
    out_dir = Path(out_dir)
    with atomic_output(out_dir, directory=True, overwrite=overwrite, what="compile folder", mark=REPORT_FILE) as tmp:
        log(f"optimizing {src.name} for ONNX Runtime ({settings.optimized_level}) and writing the ORT format "
            f"({settings.ort_format_level})")
        fusion = {"applied": False, "reason": "a scoring graph" if spec.graph != "decode" else "fuse_decode off"}
        optimize_from = src
        if spec.graph == "decode" and settings.fuse_decode:
            fused, why = ort_decode_graph(proto)
            if fused is not None:
                data = fused.SerializeToString()
                try:
                    diff = _smoke(data, src, spec)
                    why = "" if diff <= 1e-4 else f"the rebuilt graph disagrees with the exported one ({diff:.2g})"
                except ProjectableEdgeError as e:  # an onnxruntime build without the contrib kernels
                    why = f"the rebuilt graph does not run in this onnxruntime ({e})"
            fusion = {"applied": not why, "reason": why or "fp32 decode graph rebuilt with contrib kernels",
                      "nodes_exported": len(proto.graph.node)}
            if not why:
                optimize_from = data
                log(f"rebuilt {src.name} with ONNX Runtime contrib kernels ({len(proto.graph.node)} -> "
                    f"{len(fused.graph.node)} nodes)")
        ort_session(optimize_from, optimization=settings.optimized_level,
                    save_optimized=tmp / names["optimized_onnx"])
        ort_session(src, optimization=settings.ort_format_level, save_optimized=tmp / names["ort_format"],
                    ort_format=True)
        from onnxruntime.tools.ort_format_model import create_config_from_models

        cfg_path = tmp / names["required_operators"]
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
        create_config_from_models([tmp / names["ort_format"]], cfg_path, enable_type_reduction=False)
        # the tool records the (temporary) model path; point it at the shipped file name instead
        cfg_path.write_text(cfg_path.read_text().replace(str(tmp / names["ort_format"]), names["ort_format"]))
        diffs = {k: _smoke(tmp / names[k], src, spec) for k in ("optimized_onnx", "ort_format")}
        bad = {k: v for k, v in diffs.items() if not v <= 1e-4}
        if bad:
            raise ProjectableEdgeError(f"ONNX Runtime's optimized graphs of {src.name} disagree with it ({bad}); "
                                       "use optimized_level='basic'")
        opt = onnx.load(str(tmp / names["optimized_onnx"]))
        if fusion["applied"]:
            fusion["nodes_optimized"] = len(opt.graph.node)
        report = {"backend": "onnxruntime", "status": "built", "target": settings.target, "fusion": fusion,
                  "settings": settings.to_dict(), **names,
                  "levels": {"optimized_onnx": str(settings.optimized_level),
                             "ort_format": str(settings.ort_format_level)},
                  "max_abs_diff": diffs, "op_types": sorted({f"{n.domain + '::' if n.domain else ''}{n.op_type}"
                                                             for n in opt.graph.node}),
                  "onnxruntime_version": __import__("onnxruntime").__version__}
        report["files"] = {p.name: file_info(p) for p in sorted(tmp.iterdir())}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return out_dir / names["ort_format"], report


def _fusion_weights(proto: onnx.ModelProto, spec) -> tuple[dict | None, str]:
    """The weights of an exported fp32 decode graph, read from its structure, in forward order (not by
    initializer names, which the exporter merges when two are equal); (None, why) for any other graph."""
    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    nodes = list(g.node)
    if any(n.domain not in ("", "ai.onnx") for n in nodes):
        return None, "the graph already holds non-standard ops"
    if any(a.dtype != np.float32 for a in inits.values() if a.dtype.kind == "f"):
        return None, "not an fp32 graph"
    L, A, users = spec.n_layer, spec.n_head * spec.head_dim, consumers(proto)
    lns = [n for n in nodes if n.op_type == "LayerNormalization"]
    mms = [n for n in nodes if n.op_type == "MatMul" and n.input[1] in inits]
    gathers = {n.input[1]: n for n in nodes if n.op_type == "Gather" and n.input[0] in inits}
    ops = [n.op_type for n in nodes]
    counts = {"LayerNormalization": (len(lns), 2 * L + 1), "weight MatMul": (len(mms), 4 * L + 1),
              "Erf": (ops.count("Erf"), L), "Softmax": (ops.count("Softmax"), L)}
    bad = {k: got for k, (got, want) in counts.items() if got != want}
    if bad or "token" not in gathers or len(gathers) != 2:
        return None, f"not the exporter's decode structure ({bad or 'embedding lookups'})"
    w = {"wte_ext": inits[gathers.pop("token").input[0]], "wpe": inits[next(iter(gathers.values())).input[0]]}
    names = [f"h{i}.{n}" for i in range(L) for n in ("wqkv", "wo", "w1", "w2")] + ["head"]
    for name, mm in zip(names, mms):
        w[name] = inits[mm.input[1]]
        after = users.get(mm.output[0], [])
        bias = next((inits[i] for n in after if n.op_type == "Add" and len(after) == 1
                     for i in n.input if i in inits), None)
        w[name.replace("head", "head_b").replace(".w", ".b")] = (
            bias if bias is not None else np.zeros(w[name].shape[1], np.float32))
    eps = []
    for name, ln in zip([f"h{i}.{p}" for i in range(L) for p in ("ln1", "ln2")] + ["lnf"], lns):
        if len(ln.input) < 3 or ln.input[1] not in inits or ln.input[2] not in inits:
            return None, "a LayerNormalization without constant scale and bias"
        eps.append(next((a.f for a in ln.attribute if a.name == "epsilon"), 1e-5))
        w[f"{name}.w"], w[f"{name}.b"] = inits[ln.input[1]], inits[ln.input[2]]
    d = w["wte_ext"].shape[1]
    want = {"h0.wqkv": (d, 3 * A), "h0.wo": (A, d), "head": (d, spec.vocab_size), "wpe": (spec.block_size, d)}
    if any(w[k].shape != s for k, s in want.items()) or len(set(eps)) != 1:
        return None, "weight shapes or epsilons do not match the graph's spec"
    return {**w, "epsilon": float(eps[0])}, ""


def ort_decode_graph(proto: onnx.ModelProto) -> tuple[onnx.ModelProto | None, str]:
    """The exported fp32 decode graph rebuilt with ONNX Runtime's contrib kernels (Attention, SkipLayerNormalization,
    BiasGelu, a Gemm head) and one cache per layer, `past_kv_<i>` -> `present_kv_<i>` [2, N, H, P, hd], which only
    the layer's Attention reads and writes (README, "Speed"). (None, why) for other graphs."""
    spec = read_spec(proto)
    if spec.graph != "decode":
        return None, "not a decode graph"
    w, why = _fusion_weights(proto, spec)
    if w is None:
        return None, why
    L, H, hd = spec.n_layer, spec.n_head, spec.head_dim
    A, d = H * hd, w["wte_ext"].shape[1]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in w.items() if k != "epsilon"]
    inits.append(numpy_helper.from_array(np.array([-1, d], np.int64), "rows"))
    nodes = []

    def node(op, ins, outs, name, domain="", **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))

    def skip_norm(x, y, ln, bias, out, total):  # LayerNorm(x + y + bias), and x + y + bias itself
        node("SkipLayerNormalization", [x, y, f"{ln}.w", f"{ln}.b"] + ([bias] if bias else []),
             [out] + (["", "", total] if total else []), f"{ln.replace('.', '_')}/SkipLayerNormalization",
             "com.microsoft", epsilon=w["epsilon"])

    # position = the past length; the token and position embeddings enter the first norm as a skip
    node("Shape", [f"{LAYER_CACHE}0"], ["past_len"], "position/Shape", start=3, end=4)
    node("Gather", ["wpe", "past_len"], ["pos"], "position/Gather", axis=0)  # [1, d]
    node("Gather", ["wte_ext", "token"], ["emb"], "embedding/Gather", axis=0)  # [B, 1, d]
    skip_norm("emb", "pos", "h0.ln1", None, "h_0", "x_0")
    for i in range(L):
        p = f"h{i}."
        node("Attention", [f"h_{i}", p + "wqkv", p + "bqkv", "", f"{LAYER_CACHE}{i}"], [f"attn{i}", f"present_kv_{i}"],
             f"h{i}_attn/Attention", "com.microsoft", num_heads=H, qkv_hidden_sizes=[A, A, A])
        node("MatMul", [f"attn{i}", p + "wo"], [f"o{i}"], f"h{i}_wo/MatMul")
        skip_norm(f"x_{i}", f"o{i}", f"h{i}.ln2", p + "bo", f"m{i}", f"xm{i}")
        node("MatMul", [f"m{i}", p + "w1"], [f"u{i}"], f"h{i}_w1/MatMul")
        node("BiasGelu", [f"u{i}", p + "b1"], [f"gelu{i}"], f"h{i}_gelu/BiasGelu", "com.microsoft")
        node("MatMul", [f"gelu{i}", p + "w2"], [f"dn{i}"], f"h{i}_w2/MatMul")
        ln, out, total = ("lnf", "h_f", None) if i == L - 1 else (f"h{i + 1}.ln1", f"h_{i + 1}", f"x_{i + 1}")
        skip_norm(f"xm{i}", f"dn{i}", ln, p + "b2", out, total)
    node("Reshape", ["h_f", "rows"], ["h_rows"], "head/Reshape")
    node("Gemm", ["h_rows", "head", "head_b"], ["logits"], "head/Gemm")
    f = onnx.TensorProto.FLOAT
    ins, outs = {v.name: v for v in proto.graph.input}, {v.name: v for v in proto.graph.output}
    pasts = [helper.make_tensor_value_info(f"{LAYER_CACHE}{i}", f, [2, "batch", H, "past", hd]) for i in range(L)]
    presents = [helper.make_tensor_value_info(f"present_kv_{i}", f, [2, "batch", H, "past + 1", hd]) for i in range(L)]
    graph = helper.make_graph(nodes, "decode_onnxruntime", [ins["token"], *pasts], [outs["logits"], *presents], inits)
    opsets = [o for o in proto.opset_import if o.domain not in ("", "ai.onnx", "com.microsoft")]
    out = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset_of(proto)),
                                                  helper.make_opsetid("com.microsoft", 1), *opsets])
    out.ir_version = proto.ir_version
    out.producer_name = proto.producer_name
    out.doc_string = proto.doc_string + " for ONNX Runtime (contrib kernels: Attention, SkipLayerNormalization)"
    out.metadata_props.extend(proto.metadata_props)
    attach_spec(out, spec_from_onnx(out, "decode", spec))  # its own I/O, per-layer caches
    return out, ""
