"""Per-task bits/dim of every role on the held-out split, with parameter counts and FLOPs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from projectable_edge.model import count_params, flops_per_image
from projectable_edge.train import evaluate_roles, load_run, source_best


def model_sizes(meta: dict, model) -> dict[str, dict]:
    """Parameters of one task's deployable model per role (the BOS vector counted), plus totals."""
    src, small, n = model.src_cfg, model.small_cfg, model.n_task
    per_task_small = count_params(small, extra=small.d_model)
    return {
        "source": {"params": count_params(src, extra=src.d_model),
                   "params_total": count_params(src, extra=n * src.d_model),
                   "flops_per_image": flops_per_image(src)},
        "projected": {"params": per_task_small, "params_total": per_task_small,
                      "flops_per_image": flops_per_image(small),
                      "operator_params": model.projector.n_params()},
        "universal": {"params": per_task_small, "params_total": count_params(small, extra=n * small.d_model),
                      "flops_per_image": flops_per_image(small)},
        "scratch": {"params": per_task_small, "params_total": n * per_task_small,
                    "flops_per_image": flops_per_image(small)},
    }


def evaluate_run(run: Path, split: str = "test") -> dict:
    """The table `projectable-edge evaluate` prints: per-task and macro bits/dim per role."""
    meta, model, data = load_run(run)
    x, t = data.splits[split]
    bits = evaluate_roles(model, x, t, data.n_tasks, roles=("projected", "universal", "scratch"))
    bits["source"] = evaluate_roles(source_best(run, model), x, t, data.n_tasks, roles=("source",))["source"]
    roles = ("source", "projected", "universal", "scratch")
    start = time.perf_counter()
    for task in range(data.n_tasks):
        model.specialise("projected", task)
    projection_ms = (time.perf_counter() - start) * 1000 / data.n_tasks
    return {
        "run": str(run),
        "split": split,
        "n_images": int(len(x)),
        "tasks": [{"task": name, "n_images": int((t == i).sum()),
                   "bits_per_dim": {r: float(bits[r][i]) for r in roles}}
                  for i, name in enumerate(data.task_names)],
        "macro_bits_per_dim": {r: float(np.mean(bits[r])) for r in roles},
        "projected_wins": int(sum(bits["projected"][i] < bits["universal"][i] for i in range(data.n_tasks))),
        "models": model_sizes(meta, model),
        "projection_ms": projection_ms,
    }


def plot_bits(report: dict, path: Path) -> Path:
    """A bar chart of bits/dim per task and role (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = list(report["macro_bits_per_dim"])
    names = [t["task"] for t in report["tasks"]] + ["macro"]
    vals = {r: [t["bits_per_dim"][r] for t in report["tasks"]] + [report["macro_bits_per_dim"][r]] for r in roles}
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 3.5))
    width = 0.8 / len(roles)
    for i, r in enumerate(roles):
        ax.bar(np.arange(len(names)) + i * width, vals[r], width, label=r)
    ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
    lo = min(min(v) for v in vals.values())
    ax.set_ylim(lo * 0.9, None)
    ax.set_ylabel(f"bits/dim ({report['split']})")
    ax.legend(ncol=len(roles), fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
