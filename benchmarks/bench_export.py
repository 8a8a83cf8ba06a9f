"""Export benchmark: every ratio below is measured side by side in one run (warm-up, many runs, medians).

  ONNX Runtime vs PyTorch eager scoring latency (batch 1 and 32)
  KV-cache sampling (decode graph) vs full recompute (scoring graph) for one full image
  FP16 / INT8 dynamic / INT8 static vs FP32 latency (ONNX Runtime CPU), with bits/dim of each

Defaults: the 'small' preset's small model (n_layer 4, n_head 4, d_model 32, d_attn 32, d_mlp 128,
vocab 17, block 64), briefly trained on synthetic bar images so quantization error is realistic.
Usage: .venv/bin/python benchmarks/bench_export.py [--projected STEM] [--runs 200] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # tests/tiny_models.py: the synthetic model and tokens

from projectable_edge.exporters.onnx_export import export_onnx  # noqa: E402
from projectable_edge.exporters.quantize import QuantizeSettings, quantize  # noqa: E402
from projectable_edge.model import ModelConfig  # noqa: E402
from projectable_edge_runtime.benchmark import time_calls  # noqa: E402
from projectable_edge_runtime.graphs import CacheLayout  # noqa: E402
from projectable_edge_runtime.runners import OrtRunner, ort_session  # noqa: E402
from projectable_edge_runtime.sampler import sample_kv, sample_recompute  # noqa: E402
from tiny_models import synthetic_tokens, tiny_trained_model  # noqa: E402


def timed(fn, warmup: int, runs: int) -> dict:
    ts = sorted(t * 1000 for t in time_calls(fn, runs, warmup))
    return {"median_ms": statistics.median(ts), "p10_ms": ts[len(ts) // 10], "p90_ms": ts[(9 * len(ts)) // 10],
            "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--projected", type=Path, help="benchmark a projected model file instead of a synthetic one")
    for k, v in (("n-layer", 4), ("n-head", 4), ("d-model", 32), ("d-attn", 32), ("d-mlp", 128), ("vocab", 17),
                 ("block", 64)):
        ap.add_argument(f"--{k}", type=int, default=v)
    ap.add_argument("--train-steps", type=int, default=150, help="Adam steps on synthetic data (0 = random init)")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--sample-runs", type=int, default=10, help="runs of the (slow) full-image sampling timings")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads and torch threads")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    log = (lambda s: print(s, file=sys.stderr)) if a.json else print

    if a.projected:
        from projectable_edge.project import load_projected

        model, _ = load_projected(a.projected)
        cfg = model.cfg
    else:
        cfg = ModelConfig(vocab_size=a.vocab, block_size=a.block, n_layer=a.n_layer, n_head=a.n_head,
                          d_model=a.d_model, d_attn=a.d_attn, d_mlp=a.d_mlp)
        model = tiny_trained_model(cfg, steps=a.train_steps)
    side = int(round(cfg.block_size ** 0.5))
    train = synthetic_tokens(256, seed=5, side=side, levels=cfg.vocab_size)[:, : cfg.block_size]
    held = synthetic_tokens(128, seed=99, side=side, levels=cfg.vocab_size)[:, : cfg.block_size]
    res: dict = {"model": cfg.to_dict(), "threads": a.threads, "torch": torch.__version__}

    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        log(f"exporting {cfg.to_dict()}")
        art, rep = export_onnx(model, None, td / "exp", heldout=held, log=lambda s: None)
        res["parity_max_abs_logits"] = {g: rep["graphs"][g]["parity"]["outputs"]["logits"]["max_abs"]
                                        for g in rep["graphs"]}
        variants = {"fp32": art.scoring}
        res["bits_per_dim"] = {"pytorch": rep["graphs"]["scoring"]["parity"]["bits_per_dim"]["pytorch"],
                               "fp32": rep["graphs"]["scoring"]["parity"]["bits_per_dim"]["onnx"]}
        res["float_layers"] = {}
        for p in ("fp16", "int8-dynamic", "int8-static"):
            path, q = quantize(art.scoring, QuantizeSettings(p, on_budget_fail="report"), td / f"{p}.onnx",
                               calibration=train, heldout=held)
            variants[p] = path
            res["bits_per_dim"][p] = q["bits_per_dim"]["variant"]
            res["float_layers"][p] = q["float_layers"].get("float_matmuls", q["float_layers"].get("fp32_nodes"))
            if p == "fp16":
                res["fp16_choice"] = q["fp16_choice"]
        # does quantizing the attention products too cost accuracy? (default leaves them float)
        _, q = quantize(art.scoring, QuantizeSettings("int8-static", quantize_attention=True, on_budget_fail="report"),
                        td / "s8att.onnx", calibration=train, heldout=held)
        res["bits_per_dim"]["int8-static+attention"] = q["bits_per_dim"]["variant"]

        lat: dict = {}
        for b in (1, 32):
            x = held[:b]
            xt = torch.from_numpy(x)
            with torch.no_grad():
                lat[f"pytorch_b{b}"] = timed(lambda: model(xt), a.warmup, a.runs)
            for name, path in variants.items():
                s = ort_session(path, threads=a.threads)
                lat[f"{name}_b{b}"] = timed(lambda: s.run(None, {"tokens": x}), a.warmup, a.runs)
        dec, sco = OrtRunner(art.decode, threads=a.threads), OrtRunner(art.scoring, threads=a.threads)
        layout, length = CacheLayout.of(art.specs["decode"]), cfg.block_size
        lat["sample_kv_cache"] = timed(lambda: sample_kv(dec, layout, 1, length, seed=0), 2, a.sample_runs)
        lat["sample_recompute"] = timed(lambda: sample_recompute(sco, 1, length, seed=0), 2, a.sample_runs)
        res["latency"] = lat

    m = {k: v["median_ms"] for k, v in lat.items()}
    # speedup = slower-candidate time / faster-candidate time as named: > 1 means the first one wins
    res["speedups"] = {
        "ort_vs_pytorch_b1": m["pytorch_b1"] / m["fp32_b1"],
        "ort_vs_pytorch_b32": m["pytorch_b32"] / m["fp32_b32"],
        "kv_cache_vs_recompute_sampling": m["sample_recompute"] / m["sample_kv_cache"],
        **{f"{p}_vs_fp32_b{b}": m[f"fp32_b{b}"] / m[f"{p}_b{b}"]
           for p in ("fp16", "int8-dynamic", "int8-static") for b in (1, 32)},
    }
    if a.json:
        print(json.dumps(res, indent=2))
        return
    print(f"\nparity max |logits diff| vs PyTorch: {res['parity_max_abs_logits']}")
    print("\nlatency, median [p10, p90] ms:")
    for k, v in lat.items():
        print(f"  {k:24s} {v['median_ms']:9.3f} [{v['p10_ms']:.3f}, {v['p90_ms']:.3f}]  ({v['runs']} runs)")
    print("\nspeedups, median time ratio (A_vs_B > 1 means A is faster than B):")
    for k, v in res["speedups"].items():
        print(f"  {k:36s} {v:7.2f}x")
    fp32 = res["bits_per_dim"]["fp32"]
    print("\nbits/dim on held-out synthetic tokens:")
    for k, v in res["bits_per_dim"].items():
        print(f"  {k:24s} {v:.5f} ({(v - fp32) / fp32:+.3%} vs fp32)")
    c = res["fp16_choice"]
    nan = float("nan")
    print(f"\nfp16 kept in fp32: {c['kept_fp32_op_types'] or 'nothing'} (numpy fp16 emulation, bits/dim: "
          f"all fp16 {c.get('bits_all_fp16', nan):.5f}, sensitive ops in fp32 "
          f"{c.get('bits_sensitive_ops_fp32', nan):.5f}, fp32 {c.get('bits_fp32', nan):.5f})")
    print(f"int8 layers left in float: {res['float_layers']['int8-static']}")


if __name__ == "__main__":
    main()
