"""CLI commands for targets and bundles: targets, generate, benchmark, sample."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.profiles import DEFAULT_TARGET
from projectable_edge.cli_common import check_out_writable, check_png, choice_enum, emit_json, err, show
from projectable_edge.pipeline.plan import precision_choices

GeneratePrecision = choice_enum("GeneratePrecision", precision_choices())
BundlePrecision = choice_enum("BundlePrecision", tuple(dict.fromkeys((*variants.profile_precisions(), *variants.VARIANTS))))


def targets(as_json: bool = typer.Option(False, "--json")):
    """List the device profiles in devices/ (add a TOML file there to add a target)."""
    from projectable_edge_runtime.devices.profiles import list_profiles

    profiles = list_profiles()
    if as_json:
        emit_json({"targets": [p.to_dict() for p in profiles]})
        return
    table = Table(title="targets")
    for c in ("name", "aliases", "arch", "backend", "precisions", "p99 budget (ms)", "memory budget (MB)"):
        table.add_column(c)
    for p in profiles:
        table.add_row(p.name, ", ".join(p.aliases), p.arch, p.compile_backend, ", ".join(p.precisions),
                      f"{p.budgets.p99_latency_ms:g}", f"{p.budgets.memory_mb}")
    show(table)


def generate(
    task: str = typer.Option(..., help="Task name or index known to the source run."),
    target: str = typer.Option(DEFAULT_TARGET, help="Device profile name or alias (see `targets`), or a TOML path."),
    source: Path = typer.Option(Path("runs/digits"), help="Run folder written by `train`.", resolve_path=True),
    precision: GeneratePrecision = typer.Option("auto", help="auto: every precision of the profile, in its order."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Bundle folder (default bundles/<task>__<target>).", resolve_path=True),
    overwrite: bool = typer.Option(False, help="Replace an existing bundle (atomically)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Step cache (default: .cache beside the bundle folder).", resolve_path=True),
    cache: bool = typer.Option(True, help="Reuse the export and quantization of identical inputs."),
    sign_key: Optional[Path] = typer.Option(None, help="Ed25519 private key (PEM) that signs the manifest; "
                                                       "devices check it with --public-key.", resolve_path=True),
    ladder: bool = typer.Option(False, "--ladder", help="Put every (size, precision) of the run's size ladder "
                                                          "in the bundle, for `tune` on the device to choose."),
    references: bool = typer.Option(False, "--references", help="Also the source, universal and scratch models' "
                                                                "test-split rows (builds the run's baseline roles)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
):
    """Project, export, quantize, measure, compile and validate one task for one device: writes a bundle."""
    from projectable_edge.pipeline import GenerateSettings
    from projectable_edge.pipeline import generate as run_generate
    from projectable_edge_runtime.bundle.manifest import to_json

    settings = GenerateSettings(task=task, target=target, source=str(source), precision=str(precision),
                                out=str(out_dir) if out_dir else None, overwrite=overwrite,
                                cache_dir=str(cache_dir) if cache_dir else None, cache=cache,
                                sign_key=str(sign_key) if sign_key else None, ladder=ladder, references=references)
    check_out_writable(out_dir if out_dir else Path("bundles") / "bundle")
    if cache_dir and cache:
        check_out_writable(cache_dir, "--cache-dir", inside=True)
    path, m = _with_progress(lambda log: run_generate(settings, log=log), quiet=as_json)
    if as_json:
        emit_json({"bundle": str(path), "manifest": to_json(m)})
        return
    table = Table(title=f"{path}  (selected: {m.selected}, engine: {m.engine.status})")
    for c in ("candidate", "bits/dim", "vs fp32", "vs PyTorch", "host p50 b1 (ms)", "host p99 b1 (ms)", "validation"):
        table.add_column(c, justify="right")
    for n, c in m.candidates.items():
        a, lat = c.accuracy, c.latency_host
        table.add_row(n, f"{a.bits:.4f}", f"{a.vs_fp32:+.4f}", f"{a.bits - a.reference_bits:+.4f}",
                      f"{lat.p50_ms:.3f}", f"{lat.p99_ms:.3f}", "pass" if a.passed else "FAIL")
    show(table)
    if m.ladder is not None:
        _candidates_table(m)
    for n, why in m.selection.passed_over.items():
        err.print(f"passed over {n}: {why}")
    for line in m.exercised.not_done:
        err.print("[yellow]not exercised here:[/] " + escape(line), markup=True)


def _candidates_table(m) -> None:
    """The ladder's candidates: accuracy, host latency and the labelled device-latency estimate."""
    table = Table(title=f"candidates, {m.ladder.order} (device latency is an ESTIMATE)")
    for c in ("candidate", "bits/dim", "vs universal", "host p99 b1 (ms)", "device p50 ESTIMATE (ms)",
              "estimate error (out of sample)"):
        table.add_column(c, justify="right")
    for n, c in m.candidates.items():
        e = c.estimate
        dev = "n/a" if e.get("device_p50_ms") is None else f"{e['device_p50_ms']:.4f}"
        table.add_row(n, f"{c.accuracy.bits:.4f}", f"{c.accuracy.vs_universal:+.4f}", f"{c.latency_host.p99_ms:.3f}",
                      dev, "n/a" if e["error_ratio"] is None else f"{e['error_ratio']:.2f}x")
    show(table)
    pick = m.ladder.host_pick
    err.print(f"host pick: {pick['explanation']} ({pick['note']})")


def _with_progress(fn, quiet: bool):
    """Run fn(log) under a spinner that shows the current step."""
    if quiet:
        return fn(lambda m: None)
    import time

    start = time.perf_counter()
    with err.status("generating") as status:
        def log(m):
            err.print(f"  {time.perf_counter() - start:5.1f}s  {m}", highlight=False)
            status.update(escape(m))  # the spinner reads its text as markup, whatever the console's setting

        return fn(log)


def benchmark(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `generate`.", resolve_path=True),
    runs: int = typer.Option(100, help="Timed runs per measurement (after warm-up)."),
    warmup: int = typer.Option(10),
    batch: int = typer.Option(16, help="Batch size of the throughput measurement."),
    precision: Optional[BundlePrecision] = typer.Option(None, help="Graph variant of the main size (default: the "
                                                                    "bundle's selected one)."),
    histogram: Optional[Path] = typer.Option(None, help="Also write a PNG latency histogram.", resolve_path=True),
    as_json: bool = typer.Option(False, "--json"),
):
    """Latency p50/p90/p99, throughput and peak memory of a bundle, against the target's budgets."""
    import projectable_edge_runtime as runtime
    from projectable_edge_runtime.commands.console import benchmark_text, outside_bundle

    if histogram:
        outside_bundle(bundle, histogram, "histogram")
        check_png(histogram, "--histogram")
    with runtime.load(bundle, precision=None if precision is None else str(precision)) as model:
        report = runtime.benchmark(model, runs=runs, warmup=warmup, batch=batch, raw=histogram is not None)
    if histogram:
        _histogram(report, histogram)
        for s in report["results"].values():
            s.pop("times_ms", None)
    if as_json:
        emit_json(report)
    else:
        print(benchmark_text(report))
    if report["verdict"] != "pass":
        raise typer.Exit(1)


def _histogram(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report["results"]), figsize=(4 * len(report["results"]), 3))
    for ax, (k, s) in zip(axes, report["results"].items()):
        ax.hist(s["times_ms"], bins=30)
        ax.axvline(s["p99_ms"], color="r", ls="--", label="p99")
        ax.set_title(k)
        ax.set_xlabel("ms")
        ax.legend()
    fig.tight_layout()
    from projectable_edge_runtime.bundle.atomic import atomic_output

    with atomic_output(path, overwrite=True, what="histogram") as tmp:  # world-readable, never half-written
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def sample(
    bundle: Path = typer.Argument(..., help="Bundle folder written by `generate`.", resolve_path=True),
    n: int = typer.Option(16, "-n", help="Number of images."),
    out_path: Path = typer.Option(Path("samples.png"), "--out", help="PNG grid to write.", resolve_path=True),
    seed: int = typer.Option(0),
    temperature: float = typer.Option(1.0),
    top_k: Optional[int] = typer.Option(None),
    cols: Optional[int] = typer.Option(None, help="Images per row (default: up to 8)."),
    scale: int = typer.Option(4, help="Pixels per image pixel in the grid."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Sample new images of the bundle's task with the small model (KV-cache decode) into a PNG grid."""
    import projectable_edge_runtime as runtime
    from projectable_edge_runtime.commands.console import sample_grid

    with runtime.load(bundle) as model:
        res = sample_grid(model, n, out_path, seed=seed, temperature=temperature, top_k=top_k, cols=cols,
                          scale=scale)
    if as_json:
        emit_json(res)
    else:
        err.print(f"wrote {n} samples to {out_path} (mean bits/dim under the model {res['mean_bits_per_dim']:.3f})")
