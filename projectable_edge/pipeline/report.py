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


def _candidates_chart(path: Path, manifest: dict) -> None:
    """Accuracy vs host latency and vs peak memory of every candidate, the target's budget lines and the host
    pick; hollow markers are the ESTIMATED device latency (labelled so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands, lad = manifest["candidates"], manifest["ladder"]
    budgets, pick = manifest["target"]["budgets"], lad["host_pick"]["choice"]
    sizes = lad["sizes"]
    markers = {"fp32": "o", "fp16": "s", "int8": "^"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for name, c in cands.items():
        color = f"C{sizes.index(c['size']) % 10}"
        mk = markers.get(c["variant"].split("-")[0], "D")
        bits, lat = c["accuracy"]["bits"], c["latency_host"]
        ax.scatter(lat["p99_ms"], bits, color=color, marker=mk, s=50, label=name)
        dev = c["estimate"].get("device_p50_ms")
        if dev is not None:
            ax.scatter(dev, bits, facecolors="none", edgecolors=color, marker=mk, s=50)
        if lat.get("peak_rss_mb") is not None:
            bx.scatter(lat["peak_rss_mb"], bits, color=color, marker=mk, s=50)
        if name == pick:
            for a, x in ((ax, lat["p99_ms"]), (bx, lat.get("peak_rss_mb"))):
                if x is not None:
                    a.scatter(x, bits, marker="*", s=300, facecolors="none", edgecolors="k", label=None)
    ax.axvline(budgets["p99_latency_ms"], color="r", ls="--", label=f"p99 budget {budgets['p99_latency_ms']:g} ms")
    bx.axvline(budgets["memory_mb"], color="r", ls="--", label=f"memory budget {budgets['memory_mb']} MB")
    ax.set_xscale("log")
    ax.set_xlabel("latency, score 1 image (ms, log)\nfilled: host p99 (measured); hollow: device p50 (ESTIMATE)")
    bx.set_xlabel("peak RSS of the runtime process on the host (MB)")
    ax.set_ylabel("bits/dim on the goldens (lower is better)")
    ax.set_title(f"candidates for {manifest['target']['name']} (star: host pick {pick or 'none'})", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _candidates_markdown(manifest: dict) -> list[str]:
    """The candidate table: accuracy vs fp32 and vs the same-size universal model, host latency, estimate."""
    lad = manifest["ladder"]
    est = lad["estimate"]
    lines = ["", "## Candidates (size ladder x precision)", "",
             f"Ordered {lad['order']}. **Device latency is an ESTIMATE** ({est['method']}; calibration "
             f"{est['calibration']:.3g}); *estimate error* = estimated / measured host p50 (1.00 = exact; range "
             f"{est['error_ratio_range'][0]:.2f}–{est['error_ratio_range'][1]:.2f}).", "",
             "| candidate | params | bits/dim | vs fp32 | vs universal (same size) | host p50 (ms) | host p99 (ms) | "
             "host peak MB | device p50 ESTIMATE (ms) | estimate error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n, c in manifest["candidates"].items():
        a, lat, e = c["accuracy"], c["latency_host"], c["estimate"]
        dev = "n/a" if e.get("device_p50_ms") is None else f"{e['device_p50_ms']:.4f}"
        lines.append(f"| {n}{'' if a['within_budget'] else ' (accuracy budget missed)'} | {c['model']['params']:,} | "
                     f"{a['bits']:.4f} | {a['vs_fp32']:+.4f} | {a['vs_universal']:+.4f} | {lat['p50_ms']:.3f} | "
                     f"{lat['p99_ms']:.3f} | {lat['peak_rss_mb']:.1f} | {dev} | {e['error_ratio']:.2f} |")
    lines += ["", f"Host pick: {lad['host_pick']['explanation']}. {lad['host_pick']['note']}.", "",
              "![candidates](candidates.png)"]
    return lines


def write_report(tmp: Path, manifest: dict, measured: MeasureStep, samples: int, log) -> ReportStep:
    import projectable_edge_runtime as runtime
    from projectable_edge_runtime.console import sample_grid

    with runtime.load(tmp) as model:
        sample_grid(model, samples, tmp / "samples.png", seed=0)
    _figures(tmp, manifest, measured.bench)
    text, files = _markdown(manifest, measured), ("report.md", "samples.png", "bits.png", "latency.png")
    if manifest.get("candidates"):
        _candidates_chart(tmp / "candidates.png", manifest)
        text += "\n".join(_candidates_markdown(manifest)) + "\n"
        files += ("candidates.png",)
    (tmp / "report.md").write_text(text)
    step = ReportStep(files)
    log(f"wrote {', '.join(step.files)}")
    return step
