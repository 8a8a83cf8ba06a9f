"""Measure a staged bundle the way a device will: validate every variant and time it with the runtime.

Timing runs in a fresh `python -m projectable_edge_runtime` process, so its latency and peak memory are the
torch-free runtime's own, not those of this process (which holds torch and the run).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from projectable_edge_runtime.devices.errors import ProjectableEdgeError


@dataclass(frozen=True)
class MeasureStep:
    latency: dict  # variant -> {case: percentiles}, plus host and verdict_on_host
    validation: dict  # variant -> runtime.validate report
    bench: dict  # the selected variant's full benchmark report (with raw times, for the histogram)


def _runtime_benchmark(bundle: Path, variant: str, runs: int) -> dict:
    # The installed runtime by its unique import name and an absolute bundle path: the result
    # does not depend on the working folder (no cwd= needed, none given).
    cmd = [sys.executable, "-m", "projectable_edge_runtime", "benchmark", str(Path(bundle).resolve()),
           "--precision", variant, "--backend", "onnxruntime", "--runs", str(runs), "--warmup", "5",
           "--batch", "16", "--sample-runs", "5", "--raw", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode not in (0, 1):  # 1 = over a budget: still a full report
        raise ProjectableEdgeError(f"benchmarking {variant} failed: {res.stderr.strip()[-500:]}")
    return json.loads(res.stdout)


def measure(bundle: Path, built: list[str], selected: str, bench_runs: int, log) -> MeasureStep:
    """Validate and time every built variant side by side on this host; the selected one must validate."""
    import projectable_edge_runtime as runtime

    latency, validation, bench = {}, {}, None
    for v in built:
        log(f"validating and timing {v} on this host (python -m projectable_edge_runtime)")
        with runtime.load(bundle, precision=v, backend="onnxruntime") as model:
            # the bundle path is the staging folder, gone after the rename: not recorded
            validation[v] = {k: x for k, x in runtime.validate(model).items() if k != "bundle"}
        r = _runtime_benchmark(bundle, v, bench_runs)
        latency[v] = {k: {m: x for m, x in s.items() if m != "times_ms"} for k, s in r["results"].items()}
        latency[v]["peak_rss_mb"] = r["peak_rss_mb"]
        if v == selected:
            bench = r
    if not validation[selected]["passed"]:
        raise ProjectableEdgeError(f"the {selected} variant failed validation on its goldens: "
                                   f"{validation[selected]}; nothing was written")
    latency["host"] = bench["host"]
    latency["verdict_on_host"] = {"verdict": bench["verdict"], "checks": bench["checks"],
                                  "note": "budgets are the target's; these numbers are the host's"}
    return MeasureStep(latency, validation, bench)
