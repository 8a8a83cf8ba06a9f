"""Export benchmark: every ratio below is measured side by side in one run (interleaved rounds, medians).

  ONNX Runtime vs PyTorch eager scoring latency (batch 1 and 32)
  FP16 / INT8 dynamic / INT8 static (per-channel and per-tensor) vs FP32 latency (ONNX Runtime CPU):
  the scoring graph at batch 1 and 32 and one decode step (batch 1, half the image in the cache),
  with bits/dim of each and the share of fp32 time the quantizable (weight) MatMuls take

Defaults: the 'small' preset's small model (32x4: n_head 4, d_mlp 128, vocab 17, 64 tokens); --size 64x4@16
is the 64-wide ladder size on 16x16 images (256 tokens). Briefly trained on synthetic bar images so
quantization error is realistic. Sampling speed lives in benchmarks/bench_decode.py.
Usage: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_export.py [--size 32x4@8] [--projected STEM]
       [--rounds 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/tiny_models.py: the synthetic model and tokens

from bench_decode import config  # noqa: E402
from timing import at_least, interleaved, ratio, run_main  # noqa: E402
from projectable_edge.exporters.onnx_export import export_onnx  # noqa: E402
from projectable_edge.exporters.quantize import QuantizeSettings, quantize  # noqa: E402
from projectable_edge_runtime.graphs.runners import ort_session  # noqa: E402
from tiny_models import synthetic_tokens, tiny_trained_model  # noqa: E402

PRECISIONS = {"fp16": {}, "int8-dynamic": {}, "int8-static": {},
              "int8-static/per-tensor": {"precision": "int8-static", "per_channel": False}}


def weight_matmul_share(path: Path, feed: dict, runs: int = 20) -> float:
    """Fraction of fp32 kernel time spent in MatMuls with a weight operand (what INT8 can speed up)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.enable_profiling = 1, True
    so.profile_file_prefix = str(path.parent / "profile")
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    weight = sum(e["dur"] for e in kernels if e["args"]["op_name"] in ("MatMul", "Gemm") and "attn_" not in e["name"])
    return weight / sum(e["dur"] for e in kernels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="32x4@8", help="WIDTHxLAYERS@SIDE of a synthetic model")
    ap.add_argument("--projected", type=Path, help="benchmark a projected model file instead of a synthetic one")
    ap.add_argument("--train-steps", type=at_least(0), default=150, help="Adam steps on synthetic data (0 = random init)")
    ap.add_argument("--rounds", type=at_least(1), default=30)
    ap.add_argument("--threads", type=at_least(1), default=1, help="ORT intra-op threads and torch threads")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    log = (lambda s: print(s, file=sys.stderr)) if a.json else print
    load0 = os.getloadavg()

    if a.projected:
        from projectable_edge.project import load_projected

        model, _ = load_projected(a.projected)
        cfg = model.cfg
    else:
        cfg = config(a.size)
        model = tiny_trained_model(cfg, steps=a.train_steps)
    side = int(round(cfg.block_size ** 0.5))
    train = synthetic_tokens(256, seed=5, side=side, levels=cfg.vocab_size)[:, : cfg.block_size]
    held = synthetic_tokens(32, seed=99, side=side, levels=cfg.vocab_size)[:, : cfg.block_size]
    res: dict = {"model": cfg.to_dict(), "threads": a.threads, "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        log(f"exporting {cfg.to_dict()}")
        art, rep = export_onnx(model, None, td / "exp", heldout=held, log=lambda s: None)
        res["parity_max_abs_logits"] = {g: rep["graphs"][g]["parity"]["outputs"]["logits"]["max_abs"]
                                        for g in rep["graphs"]}
        graphs = {("fp32", g): art.paths[g] for g in ("scoring", "decode")}
        res["bits_per_dim"] = {"pytorch": rep["graphs"]["scoring"]["parity"]["bits_per_dim"]["pytorch"],
                               "fp32": rep["graphs"]["scoring"]["parity"]["bits_per_dim"]["onnx"]}
        res["float_layers"] = {}
        for name, kw in PRECISIONS.items():
            settings = QuantizeSettings(**{"precision": name, **kw, "on_budget_fail": "report"})
            for g in ("scoring", "decode"):
                log(f"quantizing the {g} graph to {name}")
                graphs[name, g], q = quantize(art.paths[g], settings, td / f"{g}-{name.replace('/', '-')}.onnx",
                                              calibration=train, heldout=held)
                if g == "scoring":
                    res["bits_per_dim"][name] = q["bits_per_dim"]["variant"]
                    res["float_layers"][name] = q["float_layers"].get("float_matmuls",
                                                                      q["float_layers"].get("fp32_nodes"))
        # does quantizing the attention products too cost accuracy? (default leaves them float)
        _, q = quantize(art.scoring, QuantizeSettings("int8-static", quantize_attention=True, on_budget_fail="report"),
                        td / "s8att.onnx", calibration=train, heldout=held)
        res["bits_per_dim"]["int8-static+attention"] = q["bits_per_dim"]["variant"]

        cache = np.zeros((cfg.n_layer, 1, cfg.n_head, cfg.block_size // 2, cfg.head_dim), np.float32)
        step = {"token": np.zeros((1, 1), np.int64), "past_keys": cache, "past_values": cache}
        res["weight_matmul_share_fp32_b1"] = weight_matmul_share(art.scoring, {"tokens": held[:1]})
        fns, reps = {}, {}
        for b in (1, 32):
            xt = torch.from_numpy(held[:b])
            fns[f"pytorch_b{b}"] = lambda xt=xt: model(xt)
            for (name, g), path in graphs.items():
                s = ort_session(path, threads=a.threads)
                if g == "scoring":
                    fns[f"{name}_b{b}"] = lambda s=s, x=held[:b]: s.run(None, {"tokens": x})
                elif b == 1:
                    fns[f"{name}_step"] = lambda s=s: s.run(None, step)
        for k in fns:
            reps[k] = 1 if k.endswith("_b32") else 30 if k.endswith("_step") else 5
        log(f"timing {len(fns)} cases, {a.rounds} interleaved rounds")
        with torch.no_grad():
            t = interleaved(fns, a.rounds, reps)
    lat = {k: float(np.median(v)) * 1e3 for k, v in t.items()}
    res["latency_ms"] = lat
    res["load_average"] = [load0[0], os.getloadavg()[0]]
    # speedup = slower-candidate time / faster-candidate time as named: > 1 means the first one wins
    res["speedups"] = {
        "ort_vs_pytorch_b1": ratio(t["pytorch_b1"], t["fp32_b1"]),
        "ort_vs_pytorch_b32": ratio(t["pytorch_b32"], t["fp32_b32"]),
        **{f"{p}_vs_fp32_{c}": ratio(t[f"fp32_{c}"], t[f"{p}_{c}"]) for p in PRECISIONS for c in ("b1", "b32", "step")},
    }
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"\nload average {res['load_average'][0]:.2f} -> {res['load_average'][1]:.2f} (2-core host), "
          f"{a.threads} thread(s); parity max |logits diff| vs PyTorch: {res['parity_max_abs_logits']}")
    print(f"\nmedian latency, ms ({a.rounds} interleaved rounds):")
    for k, v in lat.items():
        print(f"  {k:30s} {v:9.3f}")
    print("\nspeedups, median over rounds of the time ratio (A_vs_B > 1 means A is faster than B):")
    for k, v in res["speedups"].items():
        print(f"  {k:40s} {v:7.2f}x")
    print(f"\nweight MatMuls' share of fp32 scoring kernel time at batch 1: {res['weight_matmul_share_fp32_b1']:.0%} "
          "(INT8 can only speed up this part)")
    fp32 = res["bits_per_dim"]["fp32"]
    print("\nbits/dim on held-out synthetic tokens:")
    for k, v in res["bits_per_dim"].items():
        print(f"  {k:24s} {v:.5f} ({(v - fp32) / fp32:+.3%} vs fp32)")
    print(f"int8 layers left in float: {res['float_layers']['int8-static']}")


if __name__ == "__main__":
    run_main(main, json_stdout=True)
