"""Leave-one-task-out: how well does each model learn a task it never saw, from k images?

Each RUN was trained with `--hold-out-task T` (it never saw T). For every k, k images of T are
drawn (nested: the 5 are among the 20, the 20 among the 100) and every method is fitted to them
with the same steps, early stopping and augmentation; all are scored (test bits/dim, lower is
better) on the same images of T: those outside the largest k.

Methods: projected adapted (fit only the source task embedding; the frozen operator makes the
small model), projected adapted + norms (embedding and the small model's norm gains/biases),
projected fine-tuned (embedding and all small weights), universal adapted (its task vector) and
fine-tuned (all its weights), universal + norms, a small model from scratch, the nearest trained
task (zero-shot, projected and universal), and the source adapted (its task embedding: the ceiling).
Runs with a second stage (`--extra-steps`) add the universal model sliced from the source
(`universal@ws`), adapted and fine-tuned the same way; methods a run lacks are skipped.

    python benchmarks/bench_adapt.py RUN [RUN ...] [--k 5,20,100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from projectable_edge import ProjectableEdgeError
from projectable_edge.adapt import AdaptConfig, fit, score
from projectable_edge.train import load_run, read_config
from timing import at_least, run_main

# (row name, role, what is fitted, other AdaptConfig settings)
METHODS = (
    ("projected adapted", "projected", "embedding", {}),
    ("projected + norms", "projected", "norms", {}),
    ("projected fine-tuned", "projected", "all", {}),
    ("universal adapted", "universal", "embedding", {}),
    ("universal + norms", "universal", "norms", {}),
    ("universal fine-tuned", "universal", "all", {}),
    ("universal@ws adapted", "universal@ws", "embedding", {}),
    ("universal@ws fine-tuned", "universal@ws", "all", {}),
    ("scratch", "scratch", "all", {}),
    ("source adapted", "source", "embedding", {}),
)


def held_out_images(data, task: str, k_max: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the k_max images to draw adaptation sets from, in a fixed order; the images scored)."""
    pool = np.concatenate([data.held_out[task][s] for s in ("train", "val", "test")])
    perm = np.random.default_rng([seed, 7]).permutation(len(pool))
    if len(pool) < k_max + 10:
        raise ProjectableEdgeError(f"task {task} has {len(pool)} images: too few for k = {k_max} plus 10 to score; "
                                   f"give a smaller --k")
    return pool[perm[:k_max]], pool[perm[k_max:]]


def run_one(run: Path, ks: list[int], steps: int, methods, log, **settings) -> list[dict]:
    meta, model, data = load_run(run)
    rows = []
    for task in data.held_out:
        draw, scored = held_out_images(data, task, max(ks), meta["train"]["seed"])
        for k in ks:
            x = draw[:k]
            for name, role, what, extra in methods:
                if role not in model.roles:
                    continue
                cfg = AdaptConfig(steps=steps, fit=what, seed=meta["train"]["seed"], **{**settings, **extra})
                a = fit(model, role, x, data.spec, cfg)
                rows.append({"run": str(run), "dataset": meta["data"]["dataset"], "seed": meta["train"]["seed"],
                             "task": task, "k": k, "method": name, "bits": score(model, role, a, scored),
                             "seconds": a.seconds, "best_step": max(c["step"] for c in a.curve if c["check"] == a.bits)})
                if what == "embedding" and role in ("projected", "universal") and not extra:
                    start = (model.source_task if role == "projected" else model.parts(role)[2])[a.nearest]
                    zero = replace(a, vector=start.detach(), deltas={})  # the nearest task, unfitted
                    rows.append({**rows[-1], "method": f"nearest task ({role})", "bits": score(model, role, zero, scored),
                                 "seconds": 0.0})
                log(f"{run.name} task {task} k={k} {name}: {[r for r in rows if r['method'] == name][-1]['bits']:.4f} "
                    f"({a.seconds:.1f} s)")
    return rows


def table(rows: list[dict], ks: list[int]) -> str:
    names = list(dict.fromkeys(r["method"] for r in rows))
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    lines = []
    for ds in datasets:
        sel = [r for r in rows if r["dataset"] == ds]
        pairs = sorted({(r["task"], r["seed"]) for r in sel})
        lines.append(f"\n{ds}: test bits/dim on images of the held-out task, macro over {len(pairs)} (task, seed) pairs")
        lines.append("| method | " + " | ".join(f"k = {k}" for k in ks) + " |")
        lines.append("|---|" + "---|" * len(ks))
        for m in names:
            cells = []
            for k in ks:
                v = [r["bits"] for r in sel if r["method"] == m and r["k"] == k]
                cells.append(f"{np.mean(v):.4f}" if v else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        universal = [m for m in names if m.startswith("universal")]  # every universal model, adapted or fine-tuned
        for mine in ("projected fine-tuned", "projected adapted"):
            wins = []
            for k in ks:
                by = {(r["task"], r["seed"], r["method"]): r["bits"] for r in sel if r["k"] == k}
                ok = [by[(t, s, mine)] < min(by[(t, s, u)] for u in universal)
                      for t, s in pairs if all((t, s, m) in by for m in (mine, *universal))]
                wins.append(f"{sum(ok)}/{len(ok)}" if ok else "-")
            lines.append(f"| {mine} beats the best universal, pairs | " + " | ".join(wins) + " |")
    return "\n".join(lines)


def image_counts(text: str) -> list[int]:
    """--k: how many images, comma-separated."""
    ks = [int(k) for k in text.split(",") if k.strip().isdigit()]
    if len(ks) != len(text.split(",")) or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of image counts such as 5,20,100")
    return ks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", type=Path, help="runs trained with --hold-out-task")
    ap.add_argument("--rows", nargs="+", type=Path, default=[],
                    help="print the table from rows saved by earlier --json runs (no fitting)")
    ap.add_argument("--k", type=image_counts, default="5,20,100")
    ap.add_argument("--steps", type=at_least(1), default=200)
    ap.add_argument("--methods", help="comma-separated method names (default: all)")
    ap.add_argument("--weight-lr", type=float, default=AdaptConfig.weight_lr,
                    help="Adam lr of every weight fit (fine-tunes, norms, scratch), the same for every model")
    ap.add_argument("--json", type=Path, help="also write every row as JSON")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ks, names = args.k, [m[0] for m in METHODS]
    unknown = [m for m in (args.methods or "").split(",") if m and m not in names]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(names)}")
    methods = [m for m in METHODS if not args.methods or m[0] in args.methods.split(",")]
    t0, rows = time.time(), []
    for f in args.rows:
        try:
            rows += json.loads(f.read_text())
        except (OSError, ValueError) as e:
            ap.error(f"cannot read --rows {f} ({e}): give the files earlier --json runs wrote")
    for run in args.runs:  # every run checked before the first fit
        if not (run / "model.safetensors").exists():
            raise ProjectableEdgeError(f"{run} is not a finished run: give a folder written by `projectable-edge train`")
        if not read_config(run)["data"].get("hold_out"):
            raise ProjectableEdgeError(f"run {run} holds out no task, so there is nothing to adapt to: train it with "
                                       f"`projectable-edge train --hold-out-task T`")
    for run in args.runs:
        rows += run_one(run, ks, args.steps, methods, lambda m: print(m, file=sys.stderr, flush=True),
                        weight_lr=args.weight_lr)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(table(rows, ks))
    fits = [r["seconds"] for r in rows if r["method"] == "projected adapted" and r["k"] == 20]
    if fits:
        print(f"\nprojected adapt wall time at k = 20 (fit only, {args.steps} steps): "
              f"median {np.median(fits):.1f} s over {len(fits)} fits; benchmark took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    run_main(main)
