"""The method's comparison table: datasets x seeds x (source, projected and every same-size baseline).

Trains one run per (dataset, seed) through the real CLI with the same preset, budget and options
(finished runs in --root are reused, so an interrupted table resumes), scores each on its
validation split (which chooses every design) and its test split (read for the final table),
and prints per seed: every role's macro bits/dim, the best same-size baseline, projected / best,
the macro difference projected - best with a 95% bootstrap interval over images (resampled
within each task), and the tasks projected wins.

    python benchmarks/method_table.py --root runs/method --datasets digits mnist --seeds 0 1 2 \
        --steps 700 --extra-steps 700 [--jobs 2] [--json table.json] [-- TRAIN OPTIONS ...]

With --budgets S1 S2 ... it trains every (dataset, seed) at each budget (S joint steps + S extra
steps) under ROOT/b<S>/, prints the table per budget, and draws the learning curves (validation
macro bits/dim against the budget, one line per role, mean over seeds) into --plot.
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

from timing import at_least

SMALL = ("projected", "universal", "universal@ws", "universal@ws+kd", "scratch")
BASELINES = SMALL[1:]
ROLES = ("source", *SMALL)
# the options that define the method, printed with every table (read from each run's config.json)
METHOD_FIELDS = ("preset", "steps", "extra_steps", "n_basis", "mixture", "lam", "projector_lr", "delta",
                 "extra_operator", "projected_lr_scale", "projected_kd", "sliced_lr_scale", "kd", "distill")


def _cli(*args: str, threads: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "projectable_edge.cli", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _failed(what: str, p: subprocess.CompletedProcess):
    """The CLI's own error and exit status (2 for a user error), not a traceback."""
    print(f"{what} failed:\n{p.stderr[-3000:]}", file=sys.stderr, end="")
    return SystemExit(p.returncode)


def run_one(run: Path, dataset: str, seed: int, preset: str, extra: list[str], threads: int) -> dict:
    """Train (unless finished) and score one run on both splits: {split: evaluate report}."""
    if not (run / "model.safetensors").exists():
        p = _cli("train", "--dataset", dataset, "--preset", preset, "--seed", str(seed), "--out", str(run),
                 "--no-progress", "--json", *extra, threads=threads)
        if p.returncode:
            raise _failed(f"train {run}", p)
    reports = {}
    for split in ("val", "test"):
        path = run / f"evaluate_{split}.json"
        if not path.exists():
            p = _cli("evaluate", str(run), "--split", split, "--json", threads=threads)
            if p.returncode:
                raise _failed(f"evaluate {run}", p)
            path.write_text(p.stdout)
        reports[split] = json.loads(path.read_text())
    summary = json.loads((run / "summary.json").read_text())
    train = json.loads((run / "config.json").read_text())["train"]
    if train["seed"] != seed:
        raise SystemExit(f"{run} was trained with seed {train['seed']}, not {seed}: use another --root")
    return {"dataset": Path(dataset).name, "seed": seed, "run": str(run), "train_seconds": summary["train_seconds"],
            "steps": summary["steps"], "extra_steps": summary.get("extra_steps", 0), **reports,
            "method": {k: train.get(k) for k in METHOD_FIELDS}}


def bootstrap_diff(a: np.ndarray, b: np.ndarray, task: np.ndarray, reps: int = 2000, seed: int = 0):
    """Macro (mean over tasks of the per-task mean) of a - b and its 95% interval, images resampled
    with replacement within each task (paired: the same images for a and b)."""
    rng = np.random.default_rng(seed)
    d = a - b
    tasks = np.unique(task)
    point = float(np.mean([d[task == t].mean() for t in tasks]))
    draws = np.zeros(reps)
    for t in tasks:
        dt = d[task == t]
        draws += dt[rng.integers(0, len(dt), (reps, len(dt)))].mean(axis=1)
    draws /= len(tasks)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return point, float(lo), float(hi)


def row(result: dict, split: str) -> dict:
    """One table row: macro bits per role, the best baseline on this split and the paired comparison."""
    rep = result[split]
    macro = rep["macro_bits_per_dim"]
    roles = [r for r in ROLES if r in macro]
    present = [r for r in BASELINES if r in macro]
    best = min(present, key=lambda r: macro[r])
    per = rep["per_image"]
    task = np.asarray(per["task"])
    bits = {r: np.asarray(per["bits_per_dim"][r]) for r in roles}
    diff, lo, hi = bootstrap_diff(bits["projected"], bits[best], task)
    per_task = {r: np.array([t["bits_per_dim"][r] for t in rep["tasks"]]) for r in roles}
    return {"dataset": result["dataset"], "seed": result["seed"], "split": split, "steps": result["steps"],
            "extra_steps": result["extra_steps"], **{r: macro[r] for r in roles}, "best_baseline": best,
            "ratio": macro["projected"] / macro[best], "diff": diff, "diff_lo": lo, "diff_hi": hi,
            "wins": int((per_task["projected"] < per_task[best]).sum()), "n_tasks": len(rep["tasks"]),
            "ratio_universal": macro["projected"] / macro["universal"], "train_seconds": result["train_seconds"]}


def print_table(rows: list[dict]) -> None:
    roles = [r for r in ROLES if r in rows[0]]
    print(f"| dataset | seed | {' | '.join(roles)} | best baseline | P / best | P - best [95% CI] | tasks won | P / U |")
    print("|" + "---|" * (len(roles) + 7))
    for ds in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == ds]
        for r in sub:
            print(f"| {ds} | {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in roles) +
                  f" | {r['best_baseline']} | {r['ratio']:.3f} | {r['diff']:+.4f} [{r['diff_lo']:+.4f}, "
                  f"{r['diff_hi']:+.4f}] | {r['wins']}/{r['n_tasks']} | {r['ratio_universal']:.3f} |")
        mean = {k: float(np.mean([r[k] for r in sub])) for k in roles}
        best = min((k for k in BASELINES if k in mean), key=mean.get)
        print(f"| {ds} | mean | " + " | ".join(f"{mean[k]:.4f}" for k in roles) +
              f" | {best} | {mean['projected'] / mean[best]:.3f} | | | {mean['projected'] / mean['universal']:.3f} |")


def plot_curves(by_budget: dict[int, list[dict]], path: Path) -> None:
    """Validation macro bits/dim against the budget, per dataset (mean over seeds), one line per role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted(by_budget)
    datasets = list(dict.fromkeys(r["dataset"] for rows in by_budget.values() for r in rows))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for role in ROLES:
            ys = [np.mean([r[role] for r in by_budget[b] if r["dataset"] == ds and role in r]) for b in budgets]
            ax.plot(budgets, ys, "o-" if role == "projected" else ".--", label=role, lw=2 if role == "projected" else 1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("budget S: S joint steps + S extra steps")
        ax.set_ylabel("validation macro bits/dim")
        ax.set_title(ds)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_history(results: list[dict], path: Path) -> None:
    """Validation macro bits/dim against the training step within each run of the largest budget (mean over
    seeds), one line per role: where each model stops improving, and where the second stage starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = max(r["steps"] for r in results)
    runs = [r for r in results if r["steps"] == top]
    datasets = list(dict.fromkeys(r["dataset"] for r in runs))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        curves: dict[str, dict[int, list[float]]] = {}
        for r in (r for r in runs if r["dataset"] == ds):
            for h in json.loads((Path(r["run"]) / "history.json").read_text())["history"]:
                for role, v in h["val_bits"].items():
                    if role in ROLES and h["step"] > 0:
                        curves.setdefault(role, {}).setdefault(h["step"], []).append(v)
        for role in ROLES:
            if role in curves:
                steps = sorted(curves[role])
                ax.plot(steps, [np.mean(curves[role][s]) for s in steps], lw=2 if role == "projected" else 1,
                        label=role)
        ax.axvline(top, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(f"step ({top} joint, then the second stage)")
        ax.set_ylabel("validation macro bits/dim")
        ax.set_ylim(None, np.percentile([v for c in curves.values() for x in c.values() for v in x], 90))
        ax.set_title(f"{ds} (mean of {len([r for r in runs if r['dataset'] == ds])} seeds)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, required=True, help="folder holding one run per (dataset, seed)")
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, help="joint steps (default: the preset's)")
    ap.add_argument("--extra-steps", type=int, default=0, help="second-stage steps for every small model")
    ap.add_argument("--budgets", nargs="+", type=int, help="learning curves: S joint + S extra steps for each S")
    ap.add_argument("--plot", type=Path, help="with --budgets: the learning-curve PNG")
    ap.add_argument("--history-plot", type=Path, help="validation bits/dim against the step, largest budget (PNG)")
    ap.add_argument("--jobs", type=at_least(1), default=1, help="runs trained at once (threads are split between them)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.budgets:
        plan = [(args.root / f"b{b}", ["--steps", str(b), "--extra-steps", str(b)]) for b in args.budgets]
    else:
        steps = ["--steps", str(args.steps)] if args.steps else []
        plan = [(args.root, [*steps, "--extra-steps", str(args.extra_steps)])]
    todo = [(root / f"{Path(d).name}_s{s}", d, s, budget) for root, budget in plan
            for d in args.datasets for s in args.seeds]
    for root, _ in plan:
        root.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda t: run_one(t[0], t[1], t[2], args.preset, [*t[3], *extra], threads), todo))
    out = {"train_options": extra, "preset": args.preset, "rows": []}
    by_budget: dict[int, list[dict]] = {}
    for split in ("val", "test"):
        for budget in dict.fromkeys(r["steps"] for r in results):
            sub = [r for r in results if r["steps"] == budget]
            rows = [row(r, split) for r in sub]
            methods = {json.dumps(r["method"], sort_keys=True) for r in sub}
            print(f"\n{split} split ({'chooses' if split == 'val' else 'reports'}), budget {budget} joint + "
                  f"{rows[0]['extra_steps']} extra steps; method: {' | '.join(sorted(methods))}")
            print_table(rows)
            out["rows"] += rows
            if split == "val":
                by_budget[budget] = rows
    if args.budgets and args.plot:
        plot_curves(by_budget, args.plot)
    if args.history_plot:
        plot_history(results, args.history_plot)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
