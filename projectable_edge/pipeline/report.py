"""report.md with three figures: a sample grid, bits/dim per variant vs the references, a latency histogram."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from projectable_edge.pipeline.measure import MeasureStep



@dataclass(frozen=True)
class ReportStep:
    files: tuple[str, ...]  # what it added to the bundle


def _figures(tmp: Path, manifest: dict, bench: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = manifest["accuracy"]
    refs = acc["task_test_bits"]  # every role for a trained task; projected + nearest for an adapted one
    names = list(acc["variants"]) + [f"{r} (PyTorch)" for r in refs]
    vals = [a["bits"] for a in acc["variants"].values()] + list(refs.values())
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, vals, color=["C0"] * len(acc["variants"]) + [f"C{i + 1}" for i in range(len(refs))])
    ax.set_xlim(min(vals) * 0.95, max(vals) * 1.02)
    ax.set_xlabel("bits/dim (held-out images of the task; lower is better)")
    fig.tight_layout()
    fig.savefig(tmp / "bits.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    for k, s in bench["results"].items():
        if "times_ms" in s and k.startswith("score"):
            ax.hist(s["times_ms"], bins=30, alpha=0.6, label=k)
    ax.set_xlabel(f"latency on host (ms), {manifest['selected']}")
    ax.set_ylabel("runs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(tmp / "latency.png", dpi=110)
    plt.close(fig)


def _markdown(manifest: dict, measured: MeasureStep) -> str:
    acc, lat = manifest["accuracy"], measured.latency
    lines = [f"# Bundle: task {manifest['task']['name']} for {manifest['target']['name']}", "",
             f"Selected variant: **{manifest['selected']}** ({manifest['selection']['reason']}).",
             f"Engine: **{manifest['engine']['status']}** — {manifest['engine'].get('reason', '')}", "",
             "| variant | bits/dim | vs fp32 | host p50 score b1 (ms) | host p99 score b1 (ms) | validation |",
             "|---|---|---|---|---|---|"]
    for v, a in acc["variants"].items():
        s = lat[v]["score_batch1"]
        ok = measured.validation[v]["passed"]
        lines.append(f"| {v} | {a['bits']:.4f} | {a['delta']:+.4f} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | "
                     f"{'pass' if ok else 'FAIL'} |")
    ref = acc["task_test_bits"]
    lines += ["", "Reference (PyTorch, this task's held-out images): " +
              ", ".join(f"{r} {v:.4f}" for r, v in ref.items()), "",
              "Exercised on this host: " + "; ".join(manifest["exercised"]["done"]) + ".",
              "Not exercised here: " + ("; ".join(manifest["exercised"]["not_done"]) or "nothing") + ".", "",
              "![samples](samples.png)", "", "![bits/dim](bits.png)", "", "![latency](latency.png)", ""]
    return "\n".join(lines)


def write_report(tmp: Path, manifest: dict, measured: MeasureStep, samples: int, log) -> ReportStep:
    import projectable_edge_runtime as runtime
    from projectable_edge_runtime.console import sample_grid

    with runtime.load(tmp) as model:
        sample_grid(model, samples, tmp / "samples.png", seed=0)
    _figures(tmp, manifest, measured.bench)
    (tmp / "report.md").write_text(_markdown(manifest, measured))
    step = ReportStep(("report.md", "samples.png", "bits.png", "latency.png"))
    log(f"wrote {', '.join(step.files)}")
    return step
