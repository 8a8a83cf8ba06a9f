"""Latency, throughput and memory of a loaded bundle, judged against the target's budgets. Never one timing:
warm-up runs first (allocator, thread pool, lazy kernel selection), then many timed runs, as percentiles."""
from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from ..devices.choices import host_arch
from ..devices.errors import ProjectableEdgeError
from .validate import load_goldens


# The largest score batch worth timing: Model.score runs at most 256 images per graph call (a TensorRT engine, its
# profile's max batch: 32-64), so a larger batch only repeats those calls, for minutes on a small device.
MAX_BATCH = 256


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process (VmHWM on Linux, else getrusage)."""
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmHWM:"))
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024.0 * 1024.0) if sys.platform == "darwin" else rss / 1024.0  # bytes on macOS, KiB else


def stats(times_s: list[float], items: int, raw: bool = False) -> dict[str, Any]:
    """Percentiles and spread of per-call times, in ms; throughput in items/s."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"runs": int(len(ms)), "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "std_ms": float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            "min_ms": float(ms.min()), "max_ms": float(ms.max()),
            "spread_p99_over_p50": float(p99 / p50) if p50 > 0 else float("inf"),
            "throughput_per_s": float(items * 1e3 / ms.mean()) if ms.mean() > 0 else float("inf"),
            **({"times_ms": ms.tolist()} if raw else {})}


def check_counts(command: str, **counts: tuple) -> None:
    """Each count (value, lowest[, highest]) must be an integer in lowest..highest."""
    for name, (v, lo, *hi) in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi and v > hi[0]):
            want = f"in {lo}..{hi[0]}" if hi else f">= {lo}"
            raise ProjectableEdgeError(f"{command} '{name}' must be an integer {want}, got {v!r}")


def time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _candidates(model) -> dict[str, Any] | None:
    """A ladder bundle's candidates (the report's accuracy-vs-latency chart), with the loaded one marked."""
    m = model.manifest
    if m is None or m.ladder is None:
        return None
    rows = []
    for name, c in m.candidates.items():
        a, lat, e = c.accuracy, c.latency_host, c.estimate or {}
        rows.append({"candidate": name, "size": c.size, "variant": c.variant, "params": c.model.params,
                     "bits": a.bits, "vs_fp32": a.vs_fp32, "vs_universal": a.vs_universal,
                     "within_budget": a.within_budget, "host_p50_ms": lat and lat.p50_ms,
                     "host_p99_ms": lat and lat.p99_ms, "host_peak_rss_mb": lat and lat.peak_rss_mb,
                     "estimated_device_p50_ms": e.get("device_p50_ms"), "estimate_error_ratio": e.get("error_ratio"),
                     "estimate_label": e.get("label", "estimate")})
    return {"order": m.ladder.order, "budgets": asdict(m.target.budgets), "rows": rows,
            "host_pick": m.ladder.host_pick, "estimate": m.ladder.estimate, "tuned": model.tuned,
            "loaded": model.candidate}


def benchmark(model, runs: int = 100, warmup: int = 10, batch: int = 16, sample_runs: int | None = None,
              raw: bool = False) -> dict[str, Any]:
    """Score batch 1, score `batch`, sample full images; percentiles, memory and a budget verdict.
    raw=True also returns every timing (`times_ms`), e.g. for a latency histogram."""
    check_counts("benchmark", runs=(runs, 2), warmup=(warmup, 0), batch=(batch, 1, MAX_BATCH),
                 sample_runs=(2 if sample_runs is None else sample_runs, 2))
    sample_runs = max(2, runs // 10) if sample_runs is None else sample_runs
    tokens = load_goldens(model)[0]  # held-out task tokens (realistic values), rows repeated as needed
    x1, xb = (np.resize(tokens, (b, tokens.shape[-1])) for b in (1, batch))
    results = {
        "score_batch1": stats(time_calls(lambda: model.score(x1), runs, warmup), 1, raw),
        f"score_batch{batch}": stats(time_calls(lambda: model.score(xb), runs, warmup), batch, raw),
        "sample_full_image": stats(time_calls(lambda: model.sample(1, seed=0), sample_runs, min(warmup, 2)), 1, raw),
    }
    results["sample_full_image"].update(tokens_per_image=model.seq_len, batch=1)
    rss, budgets, p99 = peak_rss_mb(), model.profile.budgets, results["score_batch1"]["p99_ms"]
    checks = [{"name": "p99 latency, score batch 1 (ms)", "value": p99, "budget": budgets.p99_latency_ms,
               "passed": p99 <= budgets.p99_latency_ms}]
    if rss is not None:
        checks.append({"name": "peak RSS (MB)", "value": rss, "budget": budgets.memory_mb,
                       "passed": rss <= budgets.memory_mb})
    arch, execution = host_arch(), model.backend.get("execution") or {}
    is_emulated = bool(execution.get("emulated"))
    on_target = arch == model.profile.arch and not is_emulated
    # a TensorRT target measured without its engine (not built yet, no GPU, another TensorRT) is not the target
    no_engine = model.profile.compile_backend == "tensorrt" and model.backend["backend"] != "tensorrt"
    note = (f"emulated {arch} (qemu on an x86 CPU): latency is not a device measurement; rerun on the device"
            if is_emulated else
            f"measured on a {arch} host, not on the {model.profile.arch} target; rerun on the device"
            if not on_target else
            f"measured with ONNX Runtime ({', '.join(model.backend['providers'])}), not the {model.profile.name} "
            f"target's TensorRT engine ({model.backend['reason']}); rerun with the engine" if no_engine else "")
    ladder = _candidates(model)
    return {
        **({"candidates": ladder} if ladder else {}),
        "bundle": str(model.bundle_dir), "task": model.task, "target": model.profile.name,
        "candidate": model.candidate, "variant": model.variant, "backend": model.backend["backend"],
        "backend_reason": model.backend["reason"], "providers": model.backend["providers"],
        "providers_missing": model.backend["providers_missing"], "execution": execution,
        "load_time_ms": model.load_time_s * 1e3, "peak_rss_mb": rss,
        "runs": runs, "warmup": warmup, "batch": batch, "results": results,
        "budgets": {"p99_latency_ms": budgets.p99_latency_ms, "memory_mb": budgets.memory_mb},
        "checks": checks, "verdict": "pass" if all(c["passed"] for c in checks) else "fail",
        "host": {"machine": platform.machine(), "arch": arch, "cpus": os.cpu_count(),
                 "python": platform.python_version(), "on_target_arch": on_target, "emulated": is_emulated,
                 "note": note},
    }
