"""Sampling speed against its compute: per-token decode time at 64 and 256 tokens, side by side in one run.

For each model (the small preset's 32x4 model at 8x8 and 16x16, and the 64x4 ladder size at 16x16,
all exported by the real exporter, the decode graph compiled by the real ONNX Runtime compile step as
an ONNX Runtime target's bundle ships it) it times, interleaved round by round (medians; ratios are
medians of per-round ratios):
  kv         the runtime's sampler through the compiled decode graph (contrib kernels, one cache per layer;
             one image, n=1)
  kv_std     the same through the exported standard-op decode graph (what TensorRT targets ship, and
             what ONNX Runtime runs where no compiled graph applies)
  recompute  the same sampler re-running the scoring graph every step (the fallback)
  greedy     the sampler at temperature 0 (compiled graph), next to
  loop       the whole greedy image in one session.run: the compiled decode graph inside an ONNX Loop with
             ArgMax, and loop_sampled: the same with the sampler's float64 inverse CDF inside the Loop (at
             the sampler's uniforms; same tokens here): what moving the rollout into a graph would save
  step, step_std  one bare session.run of each decode graph at half the image's length (no sampling work)
  floor      one session.run of a one-node graph: what any call into ONNX Runtime costs here
and counts each decode graph's kernels (nodes after ONNX Runtime's own optimizations, level all), and
the decode step's FLOPs (torch.utils.flop_counter over the whole rollout) against torch.mm's measured
1-thread fp32 throughput at 256x256x256 (how long that arithmetic alone would take).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode.py [--rounds 40] [--models 32x4@8 32x4@16 64x4@16]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from projectable_edge.config import parse_size, preset  # noqa: E402
from projectable_edge_runtime import ProjectableEdgeError  # noqa: E402
from projectable_edge.exporters.onnx_export import export_onnx  # noqa: E402
from projectable_edge.exporters.ort_compile import compile_onnxruntime  # noqa: E402
from projectable_edge.model import ModelConfig  # noqa: E402
from projectable_edge_runtime.graphs.contract import CacheLayout, cache_pairs, per_layer  # noqa: E402
from projectable_edge_runtime.graphs.runners import OrtRunner, ort_session  # noqa: E402
from projectable_edge_runtime.graphs.sampler import sample_kv, sample_recompute, uniforms  # noqa: E402
from tiny_models import tiny_trained_model  # noqa: E402
from timing import at_least, interleaved, ratio, run_main  # noqa: E402


def config(name: str) -> ModelConfig:
    """'WIDTHxLAYERS@SIDE': the small preset's size of that name (as a ladder rung), 17 levels, SIDE x SIDE."""
    size, _, side = name.partition("@")
    if not side.isdigit() or int(side) < 2:
        raise ProjectableEdgeError(f"bad model size {name!r}: write WIDTHxLAYERS@SIDE, e.g. 32x4@8 (SIDE >= 2)")
    w = parse_size(size, preset("small").small)
    return ModelConfig(vocab_size=17, block_size=int(side) ** 2, n_layer=w.n_layer, n_head=w.n_head,
                       d_model=w.d_model, d_attn=w.d_attn, d_mlp=w.d_mlp)


def decode_flops(model, length: int) -> float:
    """FLOPs of a whole rollout of `length` decode steps (batch 1), counted by torch's flop counter."""
    cfg = model.cfg
    total = 0
    with torch.no_grad():
        for p in range(length):
            cache = torch.zeros(cfg.n_layer, 1, cfg.n_head, p, cfg.head_dim)
            with FlopCounterMode(display=False) as fc:
                model.decode_step(torch.zeros(1, 1, dtype=torch.long), cache, cache)
            total += fc.get_total_flops()
    return float(total)


def mm_flops_per_s(m: int, k: int, n: int, rounds: int = 300) -> float:
    """torch.mm fp32 throughput (1 thread, median) at [m, k] x [k, n]."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        torch.mm(a, b)
        ts.append(time.perf_counter() - t0)
    return 2 * m * k * n / float(np.median(ts))


def floor_session():
    g = oh.make_graph([oh.make_node("Identity", ["x"], ["y"])], "floor",
                      [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1])],
                      [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 18)])
    m.ir_version = 9
    s, x = ort_session(m.SerializeToString(), threads=1), {"x": np.zeros((1, 1), np.float32)}
    return lambda: s.run(None, x)


def kernels(path: Path) -> int:
    """Nodes of the graph after ONNX Runtime's optimizations at level all: the kernels one run executes."""
    with tempfile.TemporaryDirectory() as td:
        ort_session(path, threads=1, save_optimized=Path(td) / "opt.onnx")
        return len(onnx.load(str(Path(td) / "opt.onnx")).graph.node)


def loop_session(decode: Path, layout: CacheLayout, length: int, seed: int | None = None):
    """One image in one call: the decode graph as the body of an ONNX Loop, then ArgMax (greedy) or, with a
    seed, the sampler's inverse CDF in float64 inside the graph (temperature 1, no top-k) at the sampler's
    uniforms (fed as an input)."""
    m = onnx.load(str(decode))
    body = list(m.graph.node)
    pairs = cache_pairs([i.name for i in m.graph.input])
    rename = {"token": "token_in", **{p: f"{p}_in" for p, _ in pairs}}
    for node in body:
        node.input[:] = [rename.get(i, i) for i in node.input]
    f, f64, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64
    inits = list(m.graph.initializer)
    if seed is None:
        body.append(oh.make_node("ArgMax", ["logits"], ["next"], axis=-1, keepdims=1))
    else:  # choose(): z = float64 logits - max; CDF = cumsum(exp z); first id whose CDF > u * total (else last)
        v = m.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        inits += [onnx.numpy_helper.from_array(np.array(-1, np.int64), "last_axis"),
                  onnx.numpy_helper.from_array(np.array([-1], np.int64), "last_axes"),
                  onnx.numpy_helper.from_array(np.array([v - 1], np.int64), "last_id"),
                  onnx.numpy_helper.from_array(np.arange(v) == v - 1, "last_mask")]
        body += [oh.make_node("Cast", ["logits"], ["z"], to=f64),
                 oh.make_node("ReduceMax", ["z", "last_axes"], ["z_max"], keepdims=1),
                 oh.make_node("Sub", ["z", "z_max"], ["z0"]), oh.make_node("Exp", ["z0"], ["e"]),
                 oh.make_node("CumSum", ["e", "last_axis"], ["cdf"]),
                 oh.make_node("Gather", ["cdf", "last_id"], ["total"], axis=1),
                 oh.make_node("Gather", ["uniforms", "i"], ["u"], axis=0),
                 oh.make_node("Unsqueeze", ["u", "last_axes"], ["u_col"]),
                 oh.make_node("Mul", ["u_col", "total"], ["threshold"]),
                 oh.make_node("Greater", ["cdf", "threshold"], ["above"]),
                 oh.make_node("Or", ["above", "last_mask"], ["hit"]),
                 oh.make_node("Cast", ["hit"], ["hit8"], to=onnx.TensorProto.UINT8),
                 oh.make_node("ArgMax", ["hit8"], ["next"], axis=-1, keepdims=1)]
    body += [oh.make_node("Identity", ["cond_in"], ["cond_out"]), oh.make_node("Identity", ["next"], ["scan"])]
    graph = oh.make_graph(body, "step", [oh.make_tensor_value_info("i", i64, []),
                                         oh.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, []),
                                         oh.make_tensor_value_info("token_in", i64, None),
                                         *(oh.make_tensor_value_info(f"{p}_in", f, None) for p, _ in pairs)],
                          [oh.make_tensor_value_info(n, t, None) for n, t in (
                              ("cond_out", onnx.TensorProto.BOOL), ("next", i64), *((q, f) for _, q in pairs),
                              ("scan", i64))])
    extra = [] if seed is None else [oh.make_tensor_value_info("uniforms", f64, [length, 1])]
    outer = oh.make_graph([oh.make_node("Loop", ["n", "", "token", *(p for p, _ in pairs)],
                                        ["last", *(f"{q}_last" for _, q in pairs), "tokens"], body=graph)],
                          "rollout", [oh.make_tensor_value_info("n", i64, []), *m.graph.input, *extra],
                          [oh.make_tensor_value_info("tokens", i64, None)], inits)
    model = oh.make_model(outer, opset_imports=m.opset_import)
    model.ir_version = m.ir_version
    s = ort_session(model.SerializeToString(), threads=1)  # the body keeps its contrib-domain nodes
    feed = {"n": np.array(length, np.int64), "token": np.full((1, 1), layout.bos_id, np.int64),
            **{p: layout.empty(1, name=p) for p, _ in pairs}}
    if seed is not None:
        feed["uniforms"] = uniforms(seed, 1, length, 1.0)
    return lambda: s.run(None, feed)[0].reshape(1, length)


def bench_model(name: str, rounds: int, work: Path) -> dict:
    cfg = config(name)
    model = tiny_trained_model(cfg, steps=0)
    art, _ = export_onnx(model, {"parity": False}, work / name.replace("@", "_"), log=None)
    _, rep = compile_onnxruntime(art.decode, None, work / (name.replace("@", "_") + "_ort"))
    assert rep["fusion"]["applied"], rep["fusion"]
    compiled = work / (name.replace("@", "_") + "_ort") / rep["optimized_onnx"]
    dec, std = OrtRunner(compiled, threads=1), OrtRunner(art.decode, threads=1)
    sco = OrtRunner(art.scoring, threads=1)
    layout, t = CacheLayout.of(art.specs["decode"]), cfg.block_size
    mid = np.zeros((cfg.n_layer, 1, cfg.n_head, t // 2, cfg.head_dim), np.float32)
    std_feed = {"token": np.zeros((1, 1), np.int64), "past_keys": mid, "past_values": mid}
    step_feed = {"token": std_feed["token"], **per_layer(std_feed)}
    step_sess, step_std = ort_session(compiled, threads=1), ort_session(art.decode, threads=1)
    loop, loop_sampled = loop_session(compiled, layout, t), loop_session(compiled, layout, t, seed=0)
    want = sample_recompute(sco, 1, t, seed=0)  # the same tokens every way
    np.testing.assert_array_equal(sample_kv(dec, layout, 1, t, seed=0), want)
    np.testing.assert_array_equal(sample_kv(std, layout, 1, t, seed=0), want)
    np.testing.assert_array_equal(sample_kv(dec, layout, 1, t, temperature=0), loop())
    np.testing.assert_array_equal(loop_sampled(), want)
    fns = {"kv": lambda: sample_kv(dec, layout, 1, t, seed=0), "kv_std": lambda: sample_kv(std, layout, 1, t, seed=0),
           "recompute": lambda: sample_recompute(sco, 1, t, seed=0),
           "greedy": lambda: sample_kv(dec, layout, 1, t, temperature=0), "loop": loop, "loop_sampled": loop_sampled,
           "step": lambda: step_sess.run(None, step_feed), "step_std": lambda: step_std.run(None, std_feed),
           "floor": floor_session()}
    t_ = interleaved(fns, rounds, {"step": 100, "step_std": 100, "floor": 100})
    med = {k: float(np.median(v)) for k, v in t_.items()}
    return {"model": name, "config": cfg.to_dict(), "tokens": t, "kv_ms": med["kv"] * 1e3,
            "kv_std_ms": med["kv_std"] * 1e3, "recompute_ms": med["recompute"] * 1e3,
            "kv_vs_recompute": ratio(t_["recompute"], t_["kv"]),
            "kv_std_vs_recompute": ratio(t_["recompute"], t_["kv_std"]), "kv_vs_kv_std": ratio(t_["kv_std"], t_["kv"]),
            "per_token_us": med["kv"] / t * 1e6, "std_per_token_us": med["kv_std"] / t * 1e6,
            "greedy_per_token_us": med["greedy"] / t * 1e6,
            "loop_per_token_us": med["loop"] / t * 1e6, "greedy_vs_loop": ratio(t_["greedy"], t_["loop"]),
            "loop_sampled_per_token_us": med["loop_sampled"] / t * 1e6,
            "loop_sampled_vs_recompute": ratio(t_["recompute"], t_["loop_sampled"]),
            "step_us": med["step"] * 1e6, "step_std_us": med["step_std"] * 1e6, "floor_us": med["floor"] * 1e6,
            "kernels": kernels(compiled), "kernels_std": kernels(art.decode),
            "flops_per_token": decode_flops(model, t) / t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["32x4@8", "32x4@16", "64x4@16"])
    ap.add_argument("--rounds", type=at_least(1), default=40)
    ap.add_argument("--json", help="write the rows here too")
    a = ap.parse_args()
    for m in a.models:  # every name checked before the first model is timed
        config(m)
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as td:
        rows = [bench_model(m, a.rounds, Path(td)) for m in a.models]
    peak = mm_flops_per_s(256, 256, 256)
    load1 = os.getloadavg()
    print(f"load average {load0[0]:.2f} -> {load1[0]:.2f} (2-core host); onnxruntime and torch 1 thread; "
          f"torch.mm 256x256x256 {peak / 1e9:.1f} GFLOP/s")
    print("| model | tokens | KV-cache ms | recompute ms | KV vs recompute | per token µs | greedy / in-graph Loop "
          "greedy / Loop sampled µs per token (Loop sampled vs recompute) | decode step µs (kernels) "
          "| standard-op graph: KV ms, vs recompute, step µs (kernels) | floor µs | kFLOP per token "
          "| its time at the torch.mm rate, µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["compute_us_at_peak"] = r["flops_per_token"] / peak * 1e6
        print(f"| {r['model']} | {r['tokens']} | {r['kv_ms']:.2f} | {r['recompute_ms']:.2f} "
              f"| {r['kv_vs_recompute']:.2f}x | {r['per_token_us']:.1f} "
              f"| {r['greedy_per_token_us']:.1f} / {r['loop_per_token_us']:.1f} / "
              f"{r['loop_sampled_per_token_us']:.1f} ({r['loop_sampled_vs_recompute']:.2f}x) "
              f"| {r['step_us']:.1f} ({r['kernels']}) | {r['kv_std_ms']:.2f}, {r['kv_std_vs_recompute']:.2f}x, "
              f"{r['step_std_us']:.1f} ({r['kernels_std']}) | {r['floor_us']:.1f} | {r['flops_per_token'] / 1e3:.0f} "
              f"| {r['compute_us_at_peak']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"load": [load0, load1], "mm_256_flops_per_s": peak, "rows": rows},
                                           indent=1))


if __name__ == "__main__":
    run_main(main)
