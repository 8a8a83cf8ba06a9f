"""Wall time of the whole `projectable-edge generate` command, cold (`--no-cache`) and with the step cache
warm, best and median of N runs; with --baseline another checkout's console script runs interleaved with
this one (same run, same task and target), so the two are measured side by side.

    python benchmarks/bench_generate.py RUN [--task 3] [--target jetson] [--runs 5]
                                            [--baseline OTHER_CHECKOUT/.venv/bin/projectable-edge]
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import at_least, interleaved, ratio  # noqa: E402

HERE = Path(sys.executable).parent / "projectable-edge"


def generate(cli: str, args: list[str]) -> None:
    res = subprocess.run([cli, "generate", *args], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"{cli} generate failed:\n{res.stderr[-2000:]}", file=sys.stderr, end="")
        sys.exit(res.returncode)  # the CLI's own status: 2 for a user error


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--task", default="3")
    ap.add_argument("--target", default="jetson")
    ap.add_argument("--runs", type=at_least(1), default=5)
    ap.add_argument("--baseline", help="another checkout's projectable-edge console script")
    a = ap.parse_args()
    if a.baseline and not shutil.which(a.baseline):
        ap.error(f"--baseline {a.baseline} is not an executable: give OTHER_CHECKOUT/.venv/bin/projectable-edge")
    clis = {"this": str(HERE), **({"baseline": a.baseline} if a.baseline else {})}
    print(f"load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory(prefix="pe-bench-generate-") as tmp:
        common = ["--task", a.task, "--target", a.target, "--source", a.run, "--overwrite"]
        # the first (warm-up) round of each fills its warm cache; later rounds rotate their order
        times = interleaved({f"{name} {mode}": functools.partial(generate, cli, common + [
            "--out", f"{tmp}/{name}_{mode}/bundle",
            *(["--no-cache"] if mode == "cold" else ["--cache-dir", f"{tmp}/{name}_{mode}/cache"])])
            for name, cli in clis.items() for mode in ("cold", "warm")}, a.runs, {})
    print(f"load average {os.getloadavg()[0]:.2f}")
    print("| cli | mode | best s | median s | runs |\n|---|---|---|---|---|")
    for key, ts in times.items():
        print(f"| {' | '.join(key.split())} | {min(ts):.2f} | {statistics.median(ts):.2f} | "
              f"{' '.join(f'{t:.2f}' for t in ts)} |")
    if a.baseline:
        for mode in ("cold", "warm"):
            print(f"{mode}: this / baseline, best {min(times[f'this {mode}']) / min(times[f'baseline {mode}']):.2f}x, "
                  f"median of per-round ratios {ratio(times[f'this {mode}'], times[f'baseline {mode}']):.2f}x")


if __name__ == "__main__":
    main()
