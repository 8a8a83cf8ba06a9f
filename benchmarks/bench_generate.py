"""Wall time of the whole `projectable-edge generate` command, cold (`--no-cache`) and with the step cache
warm, best and median of N runs; with --baseline another checkout's console script runs interleaved with
this one (same run, same task and target), so the two are measured side by side.

    python benchmarks/bench_generate.py RUN [--task 3] [--target jetson] [--runs 5]
                                            [--baseline OTHER_CHECKOUT/.venv/bin/projectable-edge]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(sys.executable).parent / "projectable-edge"


def timed(cli: str, args: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run([cli, "generate", *args], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{cli} generate failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--task", default="3")
    ap.add_argument("--target", default="jetson")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--baseline", help="another checkout's projectable-edge console script")
    a = ap.parse_args()
    clis = {"this": str(HERE), **({"baseline": a.baseline} if a.baseline else {})}
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="pe-bench-generate-") as tmp:
        common = ["--task", a.task, "--target", a.target, "--source", a.run, "--overwrite"]
        args = {(name, mode): common + ["--out", f"{tmp}/{name}_{mode}/bundle"]
                + (["--no-cache"] if mode == "cold" else ["--cache-dir", f"{tmp}/{name}_{mode}/cache"])
                for name in clis for mode in ("cold", "warm")}
        for name, cli in clis.items():
            timed(cli, args[name, "warm"])  # fills the warm cache
        times = {k: [] for k in args}
        for _ in range(a.runs):
            for (name, mode), arg in args.items():
                times[name, mode].append(timed(clis[name], arg))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| cli | mode | best s | median s | runs |\n|---|---|---|---|---|")
    for (name, mode), ts in times.items():
        print(f"| {name} | {mode} | {min(ts):.2f} | {statistics.median(ts):.2f} | "
              f"{' '.join(f'{t:.2f}' for t in ts)} |")
    if a.baseline:
        for mode in ("cold", "warm"):
            print(f"{mode}: this / baseline, best {min(times['this', mode]) / min(times['baseline', mode]):.2f}x")


if __name__ == "__main__":
    main()
