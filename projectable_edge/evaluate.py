"""Per-task bits/dim of every role on the held-out split, with parameter counts and FLOPs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from projectable_edge.model import count_params, flops_per_image
from projectable_edge.trainables import SLICED
from projectable_edge.train import image_bits, load_run, source_best, task_means
from projectable_edge_runtime.bundle.atomic import atomic_output


def model_sizes(model) -> dict[str, dict]:
    """Parameters of one task's deployable model per role (the BOS vector counted), plus totals."""
    n = model.n_task
    out = {}
    for role in model.roles:
        cfg = model.config_of(role)
        base = role.split("@")[0]
        one = count_params(cfg, extra=cfg.d_model)
        total = {"source": count_params(cfg, extra=n * cfg.d_model), "projected": one,
                 "universal": count_params(cfg, extra=n * cfg.d_model), "scratch": n * one}[base]
        out[role] = {"params": one, "params_total": total, "flops_per_image": flops_per_image(cfg),
                     "size": f"{cfg.d_model}x{cfg.n_layer}"}
        if base == "projected":
            out[role]["operator_params"] = model.operator(role).n_params()
    return out


def ladder_rows(report: dict) -> list[dict]:
    """Projected vs universal per small size, sorted by parameters: the size-ladder curve."""
    rows = []
    for role, m in report["models"].items():
        if role.split("@")[0] != "projected":
            continue
        uni = role.replace("projected", "universal", 1)
        p, u = report["macro_bits_per_dim"][role], report["macro_bits_per_dim"][uni]
        rows.append({"size": m["size"], "params": m["params"], "flops_per_image": m["flops_per_image"],
                     "projected": p, "universal": u, "ratio": p / u, "role": role})
    return sorted(rows, key=lambda r: r["params"])


def role_image_bits(run: Path, model, tokens: np.ndarray, task_ids: np.ndarray, roles=None) -> dict[str, np.ndarray]:
    """Per-image bits/dim of each role; the source row uses the source's own best checkpoint."""
    roles = list(roles or model.roles)
    bits = image_bits(model, tokens, task_ids, roles=[r for r in roles if r != "source"])
    if "source" in roles:
        bits["source"] = image_bits(source_best(run, model), tokens, task_ids, roles=("source",))["source"]
    return {r: bits[r] for r in roles}


def role_bits(run: Path, model, tokens: np.ndarray, task_ids: np.ndarray, n_tasks: int,
              roles=None) -> dict[str, np.ndarray]:
    """Per-task bits/dim of each role; the source row uses the source's own best checkpoint."""
    return {r: task_means(b, task_ids, n_tasks) for r, b in role_image_bits(run, model, tokens, task_ids, roles).items()}


def evaluate_run(run: Path, split: str = "test") -> dict:
    """The table `projectable-edge evaluate` prints: per-task and macro bits/dim per role, and every
    image's bits per role (`per_image`, for paired statistics)."""
    meta, model, data = load_run(run)
    x, t = data.splits[split]
    roles = model.roles
    per_image = role_image_bits(run, model, x, t)
    bits = {r: task_means(b, t, data.n_tasks) for r, b in per_image.items()}
    model.specialise("projected", 0)  # the first call also pays torch's lazy start-up: not a projection's cost
    start = time.perf_counter()
    for task in range(data.n_tasks):
        model.specialise("projected", task)
    projection_ms = (time.perf_counter() - start) * 1000 / data.n_tasks
    report = {
        "run": str(run),
        "split": split,
        "n_images": int(len(x)),
        "tasks": [{"task": name, "n_images": int((t == i).sum()),
                   "bits_per_dim": {r: float(bits[r][i]) for r in roles}}
                  for i, name in enumerate(data.task_names)],
        "macro_bits_per_dim": {r: float(np.mean(bits[r])) for r in roles},
        "projected_wins": int(sum(bits["projected"][i] < bits["universal"][i] for i in range(data.n_tasks))),
        "wins": {r: int((bits["projected"] < bits[r]).sum()) for r in ("universal", "scratch", *SLICED) if r in bits},
        "per_image": {"task": t.tolist(), "bits_per_dim": {r: [round(float(v), 6) for v in b]
                                                           for r, b in per_image.items()}},
        "models": model_sizes(model),
        "projection_ms": projection_ms,
    }
    report["ladder"] = ladder_rows(report)
    for row in report["ladder"]:
        p, u = bits[row["role"]], bits[row["role"].replace("projected", "universal", 1)]
        row["wins"] = int((p < u).sum())
    report["adapted"] = adapted_rows(run, model, data)
    return report


def adapted_rows(run: Path, model, data) -> list[dict]:
    """Tasks added by `adapt`, re-measured: their projected model and the nearest trained task's, on the
    images held out from the fit (an adapted task has no test split)."""
    from projectable_edge.project import specialise
    from projectable_edge.task_registry import adapted_names, load_adapted

    rows = []
    for name in adapted_names(run):
        at = load_adapted(run, name)
        x = at.goldens()
        mine = float(at.model(model).bits(x).mean())
        near = float(specialise(model, "projected", at.adapted.nearest).bits(x).mean())
        rows.append({"task": name, "n_images": at.record["n_images"], "n_scored": int(len(x)),
                     "held_out": bool(len(at.check)), "projected": mine,
                     "nearest_task": data.task_names[at.adapted.nearest], "nearest_projected": near})
    return rows


def plot_ladder(report: dict, path: Path) -> Path:
    """Bits/dim against parameters per task model: projected vs universal across the size ladder (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["ladder"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, style in (("projected", "o-"), ("universal", "s--")):
        ax.plot([r["params"] for r in rows], [r[key] for r in rows], style, label=key)
    for r in rows:
        ax.annotate(r["size"], (r["params"], r["projected"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    src = report["macro_bits_per_dim"]["source"]
    ax.axhline(src, color="gray", lw=0.8, ls=":", label=f"source ({report['models']['source']['params']:,} params)")
    ax.set_xscale("log")
    ax.set_xticks([r["params"] for r in rows], [f"{r['params'] / 1000:.0f}k" for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("parameters per task model")
    ax.set_ylabel(f"macro bits/dim ({report['split']})")
    ax.set_title(Path(report["run"]).name, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


def _save_png(fig, path) -> Path:
    """Write a figure atomically, world-readable, replacing an older plot at `path`."""
    import matplotlib.pyplot as plt

    with atomic_output(path, overwrite=True, what="plot") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return Path(path)


def plot_bits(report: dict, path: Path) -> Path:
    """A bar chart of bits/dim per task and role (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = [r for r in report["macro_bits_per_dim"] if "@" not in r]
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
    return _save_png(fig, path)
