"""The method's comparison table: datasets x seeds x (source, projected, universal, scratch).

Trains one run per (dataset, seed) with the same preset and options through the real CLI
(finished runs in --root are reused, so an interrupted table resumes), evaluates each on
its test split, and prints per-seed rows with projected/universal ratio and tasks won,
plus the size ladder when the runs have one. Every method decision is made on this table.

    python benchmarks/method_table.py --root runs/method --datasets digits mnist --seeds 0 1 2 \
        [--jobs 2] [-- TRAIN OPTIONS ...]      # e.g. -- --mixture shared --ladder 16,64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _cli(*args: str, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "projectable_edge.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def run_one(root: Path, dataset: str, seed: int, preset: str, extra: list[str], threads: int) -> dict:
    run = root / f"{Path(dataset).name}_s{seed}"
    if not (run / "model.safetensors").exists():
        p = _cli("train", "--dataset", dataset, "--preset", preset, "--seed", str(seed), "--out", str(run),
                 "--no-progress", "--json", *extra, threads=threads)
        if p.returncode:
            raise SystemExit(f"train {run} failed:\n{p.stderr[-3000:]}")
    report = run / "evaluate_test.json"
    if not report.exists():
        p = _cli("evaluate", str(run), "--json", threads=threads)
        if p.returncode:
            raise SystemExit(f"evaluate {run} failed:\n{p.stderr[-3000:]}")
        report.write_text(p.stdout)
    summary = json.loads((run / "summary.json").read_text())
    return {"dataset": Path(dataset).name, "seed": seed, "run": str(run),
            "train_seconds": summary["train_seconds"], **json.loads(report.read_text())}


def rows(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        m = r["macro_bits_per_dim"]
        out.append({"dataset": r["dataset"], "seed": r["seed"], **{k: m[k] for k in
                    ("source", "projected", "universal", "scratch")},
                    "ratio": m["projected"] / m["universal"], "wins": r["projected_wins"],
                    "n_tasks": len(r["tasks"]), "train_seconds": r["train_seconds"], "ladder": r.get("ladder", [])})
    return out


def print_table(table: list[dict]) -> None:
    print("| dataset | seed | source | projected | universal | scratch | P / U | tasks won | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ds in dict.fromkeys(r["dataset"] for r in table):
        sub = [r for r in table if r["dataset"] == ds]
        for r in sub:
            print(f"| {ds} | {r['seed']} | {r['source']:.4f} | {r['projected']:.4f} | {r['universal']:.4f} | "
                  f"{r['scratch']:.4f} | {r['ratio']:.3f} | {r['wins']}/{r['n_tasks']} | {r['train_seconds']:.0f} |")
        mean = {k: float(np.mean([r[k] for r in sub])) for k in ("source", "projected", "universal", "scratch")}
        print(f"| {ds} | mean | {mean['source']:.4f} | {mean['projected']:.4f} | {mean['universal']:.4f} | "
              f"{mean['scratch']:.4f} | {mean['projected'] / mean['universal']:.3f} | | |")
    if any(len(r["ladder"]) > 1 for r in table):
        print("\n| dataset | seed | size | params | projected | universal | P / U | tasks won |")
        print("|---|---|---|---|---|---|---|---|")
        for r in table:
            for lr in r["ladder"]:
                print(f"| {r['dataset']} | {r['seed']} | {lr['size']} | {lr['params']:,} | {lr['projected']:.4f} | "
                      f"{lr['universal']:.4f} | {lr['ratio']:.3f} | {lr['wins']}/{r['n_tasks']} |")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="folder holding one run per (dataset, seed)")
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--jobs", type=int, default=1, help="runs trained at once (threads are split between them)")
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    todo = [(d, s) for d in args.datasets for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda ds: run_one(args.root, ds[0], ds[1], args.preset, extra, threads), todo))
    table = rows(results)
    print_table(table)
    if args.json:
        args.json.write_text(json.dumps({"train_options": extra, "preset": args.preset, "rows": table}, indent=1))


if __name__ == "__main__":
    main()
