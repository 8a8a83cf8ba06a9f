"""The `projectable-edge` command line: a thin typer layer over the Python API.

Every command that reports numbers takes `--json`. Errors the user can fix print one
line and exit with status 2, anything unexpected one line and status 1; `--verbose`
(before or after the command) adds the traceback. Commands are registered explicitly in COMMANDS.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from projectable_edge import cli_device, cli_export
from projectable_edge.choices import ExtraOperator, Fit, Mixture, Preset, Split
from projectable_edge.cli_common import check_out_writable, check_png, emit_json, err, make_app, out, run_app, show
from projectable_edge_runtime.devices.errors import ProjectableEdgeError


def train(
    dataset: str = typer.Option("digits", help="'digits' or 'mnist' (built in), or an image folder with one "
                                                 "sub-folder per task."),
    preset: Preset = typer.Option("small", help="tiny (tests), small (CPU demo), small-long (the claim's budget), "
                                                "base (GPU)."),
    out: Path = typer.Option(Path("runs/digits"), help="Run folder to create.", resolve_path=True),
    steps: Optional[int] = typer.Option(None, help="Override the preset's optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Override the preset's batch size."),
    lam: Optional[float] = typer.Option(None, help="Weight of NLL(projected) in the joint loss."),
    small: Optional[str] = typer.Option(None, help="Main small size WIDTH\\[xLAYERS] (default: the preset's)."),
    ladder: Optional[str] = typer.Option(None, help="Extra small sizes, comma-separated WIDTH\\[xLAYERS] "
                                                    "(e.g. 16,64,32x2), each with its own universal baseline."),
    n_basis: Optional[int] = typer.Option(None, help="K basis maps per projection space."),
    mixture: Optional[Mixture] = typer.Option(None, help="Mixture coefficients: per_space (default) or shared."),
    distill: Optional[float] = typer.Option(None, help="Weight of KL(source || small) for every small model alike."),
    freeze_source: Optional[bool] = typer.Option(None, "--freeze-source/--tune-source",
                                                 help="Keep the source fixed (with --init-source: project a "
                                                      "pre-trained model)."),
    init_source: Optional[Path] = typer.Option(None, resolve_path=True, help="Start the source model from this "
                                               "finished run (trained on the same splits: same data options and --seed)."),
    extra_steps: Optional[int] = typer.Option(None, help="Second stage: this many extra steps for every small model "
                                                         "on the frozen source (adds universal@ws and universal@ws+kd)."),
    delta: Optional[bool] = typer.Option(None, "--delta/--no-delta", help="Second stage: the projected model also "
                                                                         "learns shared small-model weights."),
    kd: Optional[float] = typer.Option(None, help="Second stage: distillation weight of universal@ws+kd."),
    projected_kd: Optional[float] = typer.Option(None, help="Second stage: distillation weight of the projected model."),
    extra_operator: Optional[ExtraOperator] = typer.Option(None, help="Second stage: which operator weights "
                                                                      "learn (the shared delta always does)."),
    projected_lr_scale: Optional[float] = typer.Option(None, help="Second stage: the projected model's learning "
                                                                  "rates, as a multiple of the first stage's."),
    sliced_lr_scale: Optional[float] = typer.Option(None, help="Second stage: universal@ws[+kd]'s learning rate, "
                                                               "as a multiple of --lr's."),
    from_run: Optional[Path] = typer.Option(None, help="Train only the second stage, from this finished run "
                                                       "(same options and dataset, no second stage of its own).",
                                            resolve_path=True),
    seed: int = typer.Option(0, help="Seed for splits, init and batches."),
    image_size: int = typer.Option(8, min=1, help="mnist and image folders: resize to this height and width."),
    rgb: bool = typer.Option(False, help="Image folders: keep colour (3 channels)."),
    levels: int = typer.Option(17, min=2, max=256,
                               help="Image folders: gray/colour levels per channel (vocabulary size)."),
    hold_out_task: Optional[str] = typer.Option(None, help="Task name(s), comma-separated, the run never sees "
                                                           "(for `adapt` and its leave-one-out benchmark)."),
    resume: bool = typer.Option(False, help="Continue an interrupted run from its last checkpoint."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads for torch (default: torch's choice, one "
                                                            "per core; use 1 per run when runs share the cores)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train the source model, projection operator and baselines on one dataset."""
    from projectable_edge.config import preset as get_preset
    from projectable_edge.data import DataConfig
    from projectable_edge.train import train as run_train

    if threads:
        import torch

        torch.set_num_threads(threads)

    cfg = get_preset(str(preset), steps=steps, batch_size=batch_size, lam=lam, freeze_source=freeze_source, seed=seed,
                     small=small, n_basis=n_basis,
                     mixture=mixture and str(mixture), distill=distill, extra_steps=extra_steps, delta=delta, kd=kd,
                     projected_kd=projected_kd, extra_operator=extra_operator and str(extra_operator),
                     projected_lr_scale=projected_lr_scale, sliced_lr_scale=sliced_lr_scale,
                     ladder=ladder)
    data_cfg = DataConfig(dataset=dataset, seed=seed, height=image_size, width=image_size,
                          channels=3 if rgb else 1, levels=levels,
                          hold_out=() if hold_out_task is None else hold_out_task)
    if freeze_source and init_source is None:
        err.print("[yellow]note:[/] --freeze-source without --init-source keeps a randomly initialised source",
                  markup=True)
    check_out_writable(out)
    summary = run_train(cfg, data_cfg, out, resume=resume, init_source=init_source, from_run=from_run,
                        progress=progress and not as_json,
                        log=err.print)
    if as_json:
        emit_json({"run": str(out), **summary})
    else:
        out_s = ", ".join(f"{r} {v:.3f}" for r, v in summary["best_val_bits"].items())
        err.print(f"wrote {out} in {summary['train_seconds']:.0f}s; best val bits/dim: {out_s}")


def evaluate(
    run: Path = typer.Argument(..., help="Run folder written by `train`.", resolve_path=True),
    split: Split = typer.Option("test", help="Which split of every task to score."),
    plot: Optional[Path] = typer.Option(None, help="Also write a PNG bar chart of bits/dim per task.", resolve_path=True),
    plot_ladder: Optional[Path] = typer.Option(None, help="Also write a PNG of bits/dim against parameters, "
                                                          "projected vs universal, for every small size.", resolve_path=True),
    as_json: bool = typer.Option(False, "--json"),
):
    """Per-task and macro bits/dim of source, projected, universal and scratch models."""
    from projectable_edge.evaluate import evaluate_run, plot_bits
    from projectable_edge.evaluate import plot_ladder as draw_ladder

    split = str(split)
    check_png(plot, "--plot")
    check_png(plot_ladder, "--plot-ladder")
    report = evaluate_run(run, split)
    if plot:
        plot_bits(report, plot)
    if plot_ladder:
        draw_ladder(report, plot_ladder)
    if as_json:
        emit_json(report)
        return
    roles = [r for r in report["macro_bits_per_dim"] if "@" not in r or r.endswith(("@ws", "@ws+kd"))]
    table = Table(title=f"bits/dim on the {split} split of {run} (lower is better)")
    table.add_column("task")
    for r in roles:
        table.add_column(r, justify="right")
    for t in report["tasks"]:
        table.add_row(t["task"], *(f"{t['bits_per_dim'][r]:.4f}" for r in roles))
    table.add_row("macro", *(f"{report['macro_bits_per_dim'][r]:.4f}" for r in roles), style="bold")
    m = report["models"]
    table.add_row("params/task", *(f"{m[r]['params']:,}" for r in roles))
    table.add_row("MFLOPs/image", *(f"{m[r]['flops_per_image'] / 1e6:.1f}" for r in roles))
    show(table)
    if len(report["ladder"]) > 1:
        lad = Table(title="size ladder: projected vs universal of the same size (macro bits/dim)")
        for c in ("size", "params/task", "MFLOPs/image", "projected", "universal", "P / U", "tasks won"):
            lad.add_column(c, justify="right")
        for r in report["ladder"]:
            lad.add_row(r["size"], f"{r['params']:,}", f"{r['flops_per_image'] / 1e6:.1f}", f"{r['projected']:.4f}",
                        f"{r['universal']:.4f}", f"{r['ratio']:.3f}", f"{r['wins']}/{len(report['tasks'])}")
        show(lad)
    for a in report["adapted"]:
        out.print(f"adapted task {a['task']} ({a['n_images']} images): projected {a['projected']:.4f} bits/dim on "
                  f"{a['n_scored']} {'held-out' if a['held_out'] else 'fitted'} images; nearest trained task "
                  f"{a['nearest_task']}: {a['nearest_projected']:.4f}")
    wins = ", ".join(f"{r} on {w}/{len(report['tasks'])}" for r, w in report["wins"].items())
    out.print(f"projected beats {wins} tasks; one projection takes {report['projection_ms']:.2f} ms")


def tasks(run: Path = typer.Argument(..., resolve_path=True), as_json: bool = typer.Option(False, "--json")):
    """List the tasks a run knows: those it was trained on, then those added by `adapt`."""
    from projectable_edge.task_registry import adapted_names, load_adapted
    from projectable_edge.train import read_config

    names = read_config(run)["task_names"]
    rows = [{"index": i, "name": n, "kind": "trained"} for i, n in enumerate(names)]
    for n in adapted_names(run):
        r = load_adapted(run, n).record
        rows.append({"index": None, "name": n, "kind": "adapted", "n_images": r["n_images"],
                     "nearest_task": r["nearest_task"], "bits": r["bits"]})
    if as_json:
        emit_json({"tasks": rows})
    else:
        for r in rows:
            extra = (f"\tadapted from {r['n_images']} images (nearest trained task {r['nearest_task']})"
                     if r["kind"] == "adapted" else "")
            out.print(f"{'-' if r['index'] is None else r['index']}\t{r['name']}{extra}")


def adapt(
    run: Path = typer.Argument(..., help="Run folder written by `train`.", resolve_path=True),
    images: Path = typer.Option(..., help="Folder of the new task's images (any size or colour).", resolve_path=True),
    name: str = typer.Option(..., help="The new task's name (not one of the run's trained tasks)."),
    fit: Fit = typer.Option("all", help="What is fitted: 'embedding' (the operator makes the whole model), "
                                         "'norms' (+ its norm gains and biases) or 'all' (+ every small weight)."),
    steps: int = typer.Option(200, help="Adam steps."),
    lr: float = typer.Option(3e-3, help="Adam learning rate of the task embedding."),
    seed: int = typer.Option(0, help="Seed for the held-out draw and the augmentation."),
    force: bool = typer.Option(False, help="Replace a task of that name, or register a fit that is no better "
                                           "than the nearest trained task."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Add a task from a handful of images: fit its embedding (then its weights), source and operator frozen."""
    from projectable_edge.adapt import AdaptConfig
    from projectable_edge.adapt import adapt as run_adapt

    res = run_adapt(run, images, name, AdaptConfig(steps=steps, lr=lr, fit=str(fit), seed=seed), force=force,
                    log=err.print)
    if as_json:
        emit_json(res)


def project(
    run: Path = typer.Argument(..., help="Run folder written by `train`.", resolve_path=True),
    task: str = typer.Option(..., help="Task name or index."),
    out_path: Path = typer.Option(..., "--out", help="Output stem: writes STEM.safetensors and STEM.json.", resolve_path=True),
    overwrite: bool = typer.Option(False, help="Replace existing files."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Project the source model to one task (no data, no training) and write the small model."""
    from projectable_edge.project import n_params, project_task, save_projected

    small, info = project_task(run, task)
    st, js = save_projected(out_path, small, info, overwrite=overwrite)
    res = {"task": info["task"], "weights": str(st), "config": str(js), "projection_ms": info["projection_ms"],
           "params": n_params(small)}
    if as_json:
        emit_json(res)
    else:
        err.print(f"projected task {res['task']} in {res['projection_ms']:.2f} ms -> {st} ({res['params']:,} params)")


COMMANDS = (train, evaluate, tasks, adapt, project, cli_device.targets, cli_device.generate, cli_device.benchmark,
            cli_device.sample, cli_export.export, cli_export.quantize, cli_export.compile)
app = make_app(COMMANDS)


def main() -> None:
    sys.exit(run_app(app, sys.argv[1:]))


if __name__ == "__main__":
    main()
