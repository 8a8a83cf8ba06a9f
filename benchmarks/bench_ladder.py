"""Wall time and size of `generate --ladder`, the candidates' estimate errors, and `tune` on this host.

    .venv/bin/python benchmarks/bench_ladder.py --run runs/ladder --task 3 --target jetson [--json]

Runs `generate --ladder` once with the step cache off (a cold build: every size exported and
quantized), sums the bundle's bytes, then runs `python -m projectable_edge_runtime tune` on it with
the profile's budgets and once more (re-using those measurements) with a p99 budget between the two
largest sizes' fastest measured p99s. Prints one JSON object (and a short table without --json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import run_main


def _tune(bundle: Path, *extra: str) -> dict:
    cmd = [sys.executable, "-m", "projectable_edge_runtime", "tune", str(bundle), "--json", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in (0, 1):
        raise SystemExit(f"tune failed: {res.stderr.strip()[-800:]}")
    return json.loads(res.stdout)


def _between_sizes(manifest, rows: list[dict]) -> float | None:
    """A p99 budget between the two largest sizes whose fastest measured p99s differ."""
    cands = manifest.candidates
    sizes = sorted(manifest.ladder.sizes, key=lambda s: next(c.model.params for c in cands.values() if c.size == s))
    best = {s: min(r["p99_ms"] for r in rows if r["size"] == s) for s in sizes}
    for a, b in reversed(list(zip(sizes, sizes[1:]))):
        if best[a] < best[b]:
            return math.sqrt(best[a] * best[b])
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run trained with --ladder")
    ap.add_argument("--task", default="3")
    ap.add_argument("--target", default="jetson")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from projectable_edge.pipeline import GenerateSettings, generate

    with tempfile.TemporaryDirectory(prefix="bench-ladder-") as tmp:
        out = Path(tmp) / "bundle"
        start = time.perf_counter()
        with contextlib.redirect_stdout(sys.stderr):  # nothing of generate's may reach this JSON
            path, m = generate(GenerateSettings(task=args.task, target=args.target, source=str(Path(args.run).resolve()),
                                                out=str(out), cache=False, ladder=True), log=lambda s: None)
        seconds = time.perf_counter() - start
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        tuned = _tune(path, "--record", str(Path(tmp) / "t.json"))
        budget = _between_sizes(m, tuned["rows"])
        between = _tune(path, "--record", str(Path(tmp) / "t.json"), "--reuse", "--p99-ms", repr(budget)) \
            if budget else None
    cands = m.candidates
    report = {
        "target": m.target.name, "sizes": list(m.ladder.sizes), "candidates": len(cands),
        "precisions": sorted({c.variant for c in cands.values()}), "generate_seconds": seconds,
        "bundle_bytes": size, "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
        "estimate": {n: {"device_p50_ms_ESTIMATE": c.estimate["device_p50_ms"],
                         "host_p50_ms": c.latency_host.p50_ms, "error_ratio": c.estimate["error_ratio"],
                         "bits": c.accuracy.bits, "vs_universal": c.accuracy.vs_universal}
                     for n, c in cands.items()},
        "error_ratio_range_out_of_sample": m.ladder.estimate["error_ratio_range"],
        "host_pick_at_generate": m.ladder.host_pick["explanation"],
        "tune_profile_budget": tuned["explanation"],
        "tune_between_sizes": None if between is None else {"p99_budget_ms": budget, "explanation": between["explanation"],
                                                            "choice": between["choice"]},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"generate --ladder ({report['candidates']} candidates: {', '.join(report['sizes'])} x "
          f"{', '.join(report['precisions'])}) for {report['target']}: {seconds:.1f} s, bundle {size / 1e6:.2f} MB "
          f"({report['cpus']} CPUs, load average {report['load_average_1m']:.1f})")
    for n, e in report["estimate"].items():
        print(f"  {n:20s} bits {e['bits']:.4f} (vs universal {e['vs_universal']:+.4f})  host p50 {e['host_p50_ms']:.3f} ms"
              f"  device p50 ESTIMATE {e['device_p50_ms_ESTIMATE']:.4f} ms  estimate error {e['error_ratio']:.2f}x")
    print("tune, profile budget:", report["tune_profile_budget"])
    if between:
        print("tune, budget between sizes:", report["tune_between_sizes"]["explanation"])


if __name__ == "__main__":
    run_main(main, json_stdout=True)
