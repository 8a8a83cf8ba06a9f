"""Runtime overhead: `Model.score` vs a bare onnxruntime.InferenceSession on the same graph and inputs.

Both sides are timed interleaved in one process (blocks of calls, rotating which goes first),
so drift in CPU frequency or neighbours hits both equally. Two baselines:
  bare-run     session.run only (what a hand-written app would at least do)
  bare+metric  session.run + the same numpy bits/dim (same work; isolates the wrapper's cost)
Target: Model.score within 5% of bare+metric (median ratio).

    python benchmarks/bench_runtime_overhead.py [--bundle DIR] [--runs 2000] [--json]

Without --bundle a tiny model is exported with torch into a temp dir (needs torch; the
runtime under test does not).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import projectable_edge_runtime as runtime  # noqa: E402
from projectable_edge_runtime.graphs.runners import ort_session  # noqa: E402
from projectable_edge_runtime.graphs.scoring import bits_per_dim  # noqa: E402
from timing import at_least, run_main  # noqa: E402


def _tiny_bundle(dest: Path) -> Path:
    import torch

    from projectable_edge_runtime.devices.profiles import load_profile
    from projectable_edge.model import ModelConfig, SpecialisedModel, init_weights
    from projectable_edge_runtime.bundle.manifest import (SCHEMA_VERSION, Accuracy, Candidate, Engine, EngineStatus, Graphs,
                                                   Manifest, ModelFacts, Selection, Task, staged_bundle, write_manifest)
    from projectable_edge_runtime.bundle.requirements import requires_for
    from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec

    cfg = ModelConfig(vocab_size=17, block_size=64, n_layer=2, n_head=2, d_model=16, d_attn=16, d_mlp=32)
    g = torch.Generator().manual_seed(0)
    model = SpecialisedModel(cfg, init_weights(cfg, g), torch.randn(cfg.d_model, generator=g)).eval()
    tokens = torch.randint(0, 17, (8, 64), generator=g)
    with staged_bundle(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (tmp / "graphs").mkdir()
        torch.onnx.export(model, (tokens,), str(tmp / "graphs/score.onnx"), input_names=["tokens"],
                          output_names=["logits"], dynamic_axes={"tokens": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=True, verbose=False, external_data=False)
        ref = model.bits(tokens.numpy())
        np.savez(tmp / "goldens.npz", tokens=tokens.numpy(), ref_bits=ref)
        acc = Accuracy(float(ref.mean()), 0.01 * float(ref.mean()), 0.01, True, None, None, None)
        cand = Candidate("16x2", "fp32", True, "projected", ModelFacts(2, 2, 8, 17, 64, 17, 16, 1),
                         Graphs("graphs/score.onnx", None), "goldens.npz", acc)
        write_manifest(tmp, Manifest(SCHEMA_VERSION, Task("bench", 0), load_profile("x86-64-cpu"),
                                     TokenizerSpec(8, 8, 1, 17), {"16x2/fp32": cand}, "16x2/fp32",
                                     Selection("benchmark", "benchmark", {}), Engine(EngineStatus.NOT_APPLICABLE, "-"),
                                     requires_for(), {}))
    return dest


def _interleaved(fns: dict, runs: int, warmup: int, block: int = 50) -> dict[str, np.ndarray]:
    """Per-call times [rounds, block] per function: blocks of calls, order rotated each round.

    Blocks, not single calls: two ORT sessions each own a spinning thread pool, and a call that
    directly follows the *other* session's call pays for that pool's spin-down. Per-call
    alternation would charge that to whichever side switches sessions more often.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    rounds = max(3, -(-runs // block))
    times = {n: np.empty((rounds, block)) for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            f, out = fns[n], times[n][r]
            for i in range(block):
                t0 = time.perf_counter()
                f()
                out[i] = time.perf_counter() - t0
    return times


def _ratio(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Median over rounds of (block median a / block median b), with its IQR: robust to drift."""
    r = np.median(a, axis=1) / np.median(b, axis=1)
    q1, med, q3 = np.percentile(r, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


def measure(bundle: Path, runs: int, warmup: int, threads: int | None, batches=(1, 16)) -> dict:
    model = runtime.load(bundle, precision="fp32", backend="onnxruntime", threads=threads)
    # the bare side: a plain session with the same options as the runtime's (the one session factory)
    sess = ort_session(model.score_runner.path, threads=model.backend["threads"])
    out = {"bundle": str(bundle), "runs": runs, "threads": model.backend["threads"],
           "providers": model.backend["providers"], "cases": {}, "load_average": [os.getloadavg()[0]]}
    goldens = model.goldens_path
    golden = np.load(goldens, allow_pickle=False)["tokens"].astype(np.int64)
    for b in batches:
        x = np.ascontiguousarray(np.tile(golden, (-(-b // len(golden)), 1))[:b])
        ref = bits_per_dim(sess.run(["logits"], {"tokens": x})[0], x)
        np.testing.assert_allclose(model.score(x), ref, rtol=1e-9)  # same numbers, or the timing is moot
        t = _interleaved({
            "runtime": lambda: model.score(x),
            "bare-run": lambda: sess.run(["logits"], {"tokens": x}),
            "bare+metric": lambda: bits_per_dim(sess.run(["logits"], {"tokens": x})[0], x),
        }, runs, warmup)
        out["cases"][f"batch{b}"] = {
            "median_ms": {k: float(np.median(v)) * 1e3 for k, v in t.items()},
            "p90_ms": {k: float(np.percentile(v, 90)) * 1e3 for k, v in t.items()},
            "ratio_vs_bare_metric": _ratio(t["runtime"], t["bare+metric"]),
            "ratio_vs_bare_run": _ratio(t["runtime"], t["bare-run"]),
        }
    out["load_average"].append(os.getloadavg()[0])
    out["within_5pct"] = all(c["ratio_vs_bare_metric"]["median"] <= 1.05 for c in out["cases"].values())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--runs", type=at_least(1), default=2000)
    ap.add_argument("--warmup", type=at_least(0), default=100)
    ap.add_argument("--threads", type=int, default=None,
                    help="onnxruntime intra-op threads for both sides (default: the bundle's profile)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    tmp = None
    try:
        bundle = args.bundle
        if bundle is None:
            tmp = Path(tempfile.mkdtemp(prefix="bench_rt_"))
            bundle = _tiny_bundle(tmp / "bundle")
        r = measure(bundle, args.runs, args.warmup, args.threads)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"runtime overhead on {r['bundle']} ({', '.join(r['providers'])}, threads={r['threads']}, "
              f"{r['runs']} interleaved runs each, load average {r['load_average'][0]:.2f} -> {r['load_average'][1]:.2f} "
              f"on {os.cpu_count()} cores)")
        print(f"{'case':8} {'runtime ms':>11} {'bare+metric':>12} {'bare-run':>9} "
              f"{'ratio (IQR)':>20} {'vs run':>7}")
        for k, c in r["cases"].items():
            m, q = c["median_ms"], c["ratio_vs_bare_metric"]
            print(f"{k:8} {m['runtime']:11.4f} {m['bare+metric']:12.4f} {m['bare-run']:9.4f} "
                  f"{q['median']:7.3f} ({q['q1']:.3f}-{q['q3']:.3f}) {c['ratio_vs_bare_run']['median']:7.3f}")
        print(f"within 5% of bare+metric: {'yes' if r['within_5pct'] else 'NO'}")
    return 0


if __name__ == "__main__":
    run_main(main, json_stdout=True)
