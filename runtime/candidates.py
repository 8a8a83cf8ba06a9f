"""The (size, precision) candidates of a bundle, and the manifest view that opens one of them.

A `generate --ladder` bundle lists every candidate in `manifest["candidates"]` under the name
"SIZE/VARIANT" (e.g. "32x4/int8-static"); the main size's candidates run from the top-level
graphs, the other sizes' from ladder/SIZE/. A bundle without a ladder still has candidates: its
main model's variants, so `tune` also picks a precision for an ordinary bundle.
"""
from __future__ import annotations

from typing import Any

from .devices.errors import ProjectableEdgeError
from .manifest import EngineStatus

SEP = "/"


def candidate_name(size: str, variant: str) -> str:
    return f"{size}{SEP}{variant}"


def main_size(manifest: dict[str, Any]) -> str:
    """The main model's size name ("WIDTHxLAYERS"), as the ladder names sizes."""
    m = manifest["model"]
    width = m.get("d_model") or m["n_head"] * m["head_dim"]
    return f"{width}x{m['n_layer']}"


def _synthesized(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """One candidate per variant of the main model (bundles written without --ladder)."""
    size, acc = main_size(manifest), manifest["accuracy"]
    out = {}
    for v, graphs in manifest["graphs"].items():
        row = (acc.get("variants") or {}).get(v) or {}
        out[candidate_name(size, v)] = {
            "size": size, "variant": v, "main": True, "model": manifest["model"], "graphs": graphs,
            "goldens": manifest["goldens"],
            "accuracy": {"bits": row.get("bits"), "within_budget": row.get("within_budget", True),
                         "tolerance": row.get("tolerance")}}
    return out


def table(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{name: candidate} in the manifest's order (a ladder bundle orders them by estimated device latency)."""
    return dict(manifest.get("candidates") or _synthesized(manifest))


def resolve(manifest: dict[str, Any], name: str) -> str:
    """The candidate `name` means, or an error listing them all."""
    cands = table(manifest)
    if name in cands:
        return name
    raise ProjectableEdgeError(f"unknown candidate {name!r}; this bundle has: {', '.join(cands)} "
                               "(SIZE/VARIANT; `python -m projectable_edge_runtime info BUNDLE --json` lists them)")


def view(manifest: dict[str, Any], name: str) -> tuple[dict[str, Any], str]:
    """(manifest as if the bundle held only this candidate, its variant): what `load` opens.

    The main size's candidates are the top-level graphs (its TensorRT engine applies); another size
    has its own model facts, graphs, goldens and recorded accuracy, and runs on ONNX Runtime."""
    c = table(manifest)[resolve(manifest, name)]
    v = c["variant"]
    if c.get("main"):
        return manifest, v
    acc = c.get("accuracy") or {}
    row = {"bits": acc.get("bits"), "tolerance": acc.get("tolerance")}
    engine = {"status": str(EngineStatus.NOT_APPLICABLE),
              "reason": f"ladder candidate {name}: no engine is built for it; it runs on ONNX Runtime"}
    return {**manifest, "model": c["model"], "graphs": {v: c["graphs"]}, "selected": v, "engine": engine,
            "goldens": c.get("goldens", manifest["goldens"]),
            "accuracy": {**manifest["accuracy"], "reference_bits": acc.get("reference_bits"),
                         "variants": {v: row}}}, v


def summary(manifest: dict[str, Any], tuned: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The chart's data for `benchmark --json`: every candidate's accuracy, host latency and the labelled
    device-latency estimate, the budgets, the host pick and the tuned record's state; None without a ladder."""
    if not manifest.get("candidates"):
        return None
    lad = manifest.get("ladder") or {}
    rows = []
    for name, c in manifest["candidates"].items():
        a, lat, e = c.get("accuracy") or {}, c.get("latency_host") or {}, c.get("estimate") or {}
        rows.append({"candidate": name, "size": c["size"], "variant": c["variant"], "params": c["model"].get("params"),
                     "bits": a.get("bits"), "vs_fp32": a.get("vs_fp32"), "vs_universal": a.get("vs_universal"),
                     "within_budget": a.get("within_budget"), "host_p50_ms": lat.get("p50_ms"),
                     "host_p99_ms": lat.get("p99_ms"), "host_peak_rss_mb": lat.get("peak_rss_mb"),
                     "estimated_device_p50_ms": e.get("device_p50_ms"), "estimate_error_ratio": e.get("error_ratio"),
                     "estimate_label": e.get("label", "estimate")})
    return {"order": lad.get("order"), "budgets": manifest["target"]["budgets"], "rows": rows,
            "host_pick": lad.get("host_pick"), "estimate": lad.get("estimate"), "tuned": tuned or {}}
