"""report.md with its figures, drawn from the manifest and the one measurement of each candidate (its samples
and raw timings): nothing is loaded or run again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.bundle.manifest import Manifest
from projectable_edge_runtime.commands.png import image_grid, write_png


def _figures(tmp: Path, m: Manifest, raw: dict) -> None:
    main = m.main_candidates()
    names = [c.variant for c in main.values()] + [f"{r} (PyTorch, test split)" for r in m.task_test_bits]
    vals = [c.accuracy.bits for c in main.values()] + list(m.task_test_bits.values())
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    ax.barh(names, vals, color=["C0"] * len(main) + [f"C{i + 1}" for i in range(len(m.task_test_bits))])
    ax.set_xlim(min(vals) * 0.95, max(vals) * 1.02)
    ax.set_xlabel("bits/dim (held-out images of the task; lower is better)")
    fig.tight_layout()
    fig.savefig(tmp / "bits.png", dpi=110)
    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    for k, s in raw[m.selected]["results"].items():
        if k.startswith("score"):
            ax.hist(s["times_ms"], bins=30, alpha=0.6, label=k)
    ax.set(xlabel=f"latency on host (ms), {m.selected}", ylabel="runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tmp / "latency.png", dpi=110)


def _markdown(m: Manifest) -> list[str]:
    lines = [f"# Bundle: task {m.task.name} for {m.target.name}", "",
             f"Selected: **{m.selected}** ({m.selection.reason}). Rule: {m.selection.rule}.",
             *(f"- passed over {n}: {why}" for n, why in m.selection.passed_over.items()),
             f"Engine: **{m.engine.status}** — {m.engine.reason}", "",
             "| variant | bits/dim (goldens) | vs fp32 | vs PyTorch | host p50 score b1 (ms) | host p99 score b1 (ms) "
             "| validation |", "|---|---|---|---|---|---|---|"]
    for c in m.main_candidates().values():
        a, lat = c.accuracy, c.latency_host
        lines.append(f"| {c.variant} | {a.bits:.4f} | {a.vs_fp32:+.4f} | {a.bits - a.reference_bits:+.4f} | "
                     f"{lat.p50_ms:.3f} | {lat.p99_ms:.3f} | {'pass' if a.passed else 'FAIL'} |")
    lines += ["", "Reference (PyTorch, this task's test split): " +
              ", ".join(f"{r} {v:.4f}" for r, v in m.task_test_bits.items()), "",
              "Exercised on this host: " + "; ".join(m.exercised.done) + ".",
              "Not exercised here: " + ("; ".join(m.exercised.not_done) or "nothing") + ".", "",
              "![samples](samples.png)", "", "![bits/dim](bits.png)", "", "![latency](latency.png)", ""]
    return lines


def _candidates_chart(path: Path, m: Manifest) -> None:
    """Accuracy vs host latency and vs peak memory of every candidate, the target's budget lines and the host
    pick; hollow markers are the ESTIMATED device latency (labelled so)."""
    budgets, pick = m.target.budgets, m.ladder.host_pick["choice"]
    fig = Figure(figsize=(10, 4))
    ax, bx = fig.subplots(1, 2, sharey=True)
    for name, c in m.candidates.items():
        color = f"C{m.ladder.sizes.index(c.size) % 10}"
        mk = variants.family(variants.get(c.variant).family).marker
        bits, lat = c.accuracy.bits, c.latency_host
        ax.scatter(lat.p99_ms, bits, color=color, marker=mk, s=50, label=name)
        if c.estimate.get("device_p50_ms") is not None:
            ax.scatter(c.estimate["device_p50_ms"], bits, facecolors="none", edgecolors=color, marker=mk, s=50)
        if lat.peak_rss_mb is not None:
            bx.scatter(lat.peak_rss_mb, bits, color=color, marker=mk, s=50)
        if name == pick:
            for a, x in ((ax, lat.p99_ms), (bx, lat.peak_rss_mb)):
                if x is not None:
                    a.scatter(x, bits, marker="*", s=300, facecolors="none", edgecolors="k", label=None)
    ax.axvline(budgets.p99_latency_ms, color="r", ls="--", label=f"p99 budget {budgets.p99_latency_ms:g} ms")
    bx.axvline(budgets.memory_mb, color="r", ls="--", label=f"memory budget {budgets.memory_mb} MB")
    ax.set(xscale="log", ylabel="bits/dim on the goldens (lower is better)",
           xlabel="latency, score 1 image (ms, log)\nfilled: host p99 (measured); hollow: device p50 (ESTIMATE)")
    bx.set_xlabel("peak RSS of the runtime process on the host (MB)")
    ax.set_title(f"candidates for {m.target.name} (star: host pick {pick or 'none'})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ratio(x) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _candidates_markdown(m: Manifest) -> list[str]:
    """The candidate table: accuracy vs fp32 and vs the same-size universal model, host latency, estimate."""
    e = m.ladder.estimate
    rng = e["error_ratio_range"]
    lines = ["", "## Candidates (size ladder x precision)", "",
             f"Ordered {m.ladder.order}. **Device latency is an ESTIMATE** ({e['method']}; calibration "
             f"{e['calibration']:.3g}); *estimate error* = estimated (calibrated on the other candidates) / measured "
             f"host p50 (1.00 = exact; range {_ratio(rng and rng[0])}–{_ratio(rng and rng[1])}).", "",
             "| candidate | params | bits/dim | vs fp32 | vs universal (same size) | host p50 (ms) | host p99 (ms) | "
             "host peak MB | device p50 ESTIMATE (ms) | estimate error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, c in m.candidates.items():
        a, lat, est = c.accuracy, c.latency_host, c.estimate
        dev = "n/a" if est.get("device_p50_ms") is None else f"{est['device_p50_ms']:.4f}"
        lines.append(f"| {n}{'' if a.within_budget else ' (accuracy budget missed)'} | {c.model.params:,} | "
                     f"{a.bits:.4f} | {a.vs_fp32:+.4f} | {a.vs_universal:+.4f} | {lat.p50_ms:.3f} | {lat.p99_ms:.3f} | "
                     f"{'n/a' if lat.peak_rss_mb is None else f'{lat.peak_rss_mb:.1f}'} | {dev} | "
                     f"{_ratio(est['error_ratio'])} |")
    return lines + ["", f"Host pick: {m.ladder.host_pick['explanation']}. {m.ladder.host_pick['note']}.", "",
                    "![candidates](candidates.png)"]


def write_report(tmp: Path, m: Manifest, raw: dict, log) -> tuple[str, ...]:
    """Write the report and its figures into the staged bundle; the files it added (all optional)."""
    samples = np.asarray(raw[m.selected].get("samples") or [], dtype=np.int64)
    files = ("report.md", "bits.png", "latency.png")
    if len(samples):
        write_png(tmp / "samples.png", image_grid(m.tokenizer.decode(samples), cols=min(8, len(samples)), scale=4))
        files += ("samples.png",)
    _figures(tmp, m, raw)
    lines = _markdown(m)
    if m.ladder is not None:
        _candidates_chart(tmp / "candidates.png", m)
        lines += _candidates_markdown(m)
        files += ("candidates.png",)
    (tmp / "report.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {', '.join(files)}")
    return files
