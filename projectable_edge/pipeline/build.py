"""The build passes of `generate`, each returning a typed result: export, quantize, compile (and goldens).

Export and quantization are cached by content, so a second target for the same task reuses them. Every
decision here (export parity, fp16 keep-ops, INT8 acceptance) uses the task's validation split; the test
split is only shipped as goldens and measured as the accuracy rows.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import projectable_edge.exporters.quantize as quantize_mod
from projectable_edge.exporters.compile import compile_for_target
from projectable_edge.exporters.onnx_export import REPORT_FILE, ExportSettings, export_onnx
from projectable_edge.exporters.onnx_io import tokens_sha256
from projectable_edge.exporters.quantize import QuantizeSettings
from projectable_edge.pipeline.cache import StepCache, content_key
from projectable_edge.pipeline.inputs import Size, TaskInputs
from projectable_edge_runtime.devices.choices import CompileBackend
from projectable_edge_runtime.devices.profiles import DeviceProfile
from projectable_edge_runtime.graphs.contract import GraphKind
from projectable_edge_runtime.bundle.manifest import ENGINE_RECORD_SUFFIX, Engine, EngineStatus, Graphs

LADDER_FOLDER = "ladder"


def tool_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "host": platform.machine()}


@dataclass(frozen=True)
class Export:
    graphs: Graphs  # paths in the bundle
    io: dict[str, dict]  # graph kind -> its ExportSpec dict
    parity: dict[str, dict]  # graph kind -> {ok, bits_per_dim, lines} against PyTorch (validation split)
    seconds: float


@dataclass(frozen=True)
class Quantized:
    graphs: Graphs
    within_budget: bool  # both graphs within the variant's budget vs fp32 on the validation split
    report: dict  # graph kind -> {line, calibration_sha256, bits_per_dim, float_layers}
    seconds: float


@dataclass(frozen=True)
class SizeBuild:
    size: Size
    prefix: str  # "" for the main size, "ladder/SIZE/" otherwise
    export: Export
    quantized: dict[str, Quantized]

    @property
    def goldens(self) -> str:
        return f"{self.prefix}goldens.npz"

    def graphs(self, variant: str) -> Graphs:
        return self.quantized[variant].graphs if variant in self.quantized else self.export.graphs


def export_step(size: Size, inputs: TaskInputs, root: Path, prefix: str, cache: StepCache, log) -> Export:
    """fp32 scoring + decode graphs, parity-checked against the projected model on the validation split."""
    settings = ExportSettings()
    key = content_key(step="export", model=size.model_sha256, tokens=tokens_sha256(inputs.validation),
                      settings=settings.to_dict(), tools=tool_versions())
    result = cache.fetch("export", key, root / prefix)
    if result is None:
        log("exporting to ONNX (scoring + KV-cache decode) and checking parity")
        start = time.perf_counter()
        _, report = export_onnx(size.model, settings, root / prefix / "fp32", heldout=inputs.validation, log=log)
        graphs = report["graphs"]
        result = {"files": [f"fp32/{e['file']}" for e in graphs.values()] + [f"fp32/{REPORT_FILE}"],
                  "io": {g: e["spec"] for g, e in graphs.items()},
                  "parity": {g: {k: e["parity"][k] for k in ("ok", "bits_per_dim", "lines")} for g, e in graphs.items()},
                  "seconds": time.perf_counter() - start}
        cache.store("export", key, root / prefix, result)
    else:
        log(f"export: reused the cached fp32 graphs (saved {result['seconds']:.1f}s)")
    graphs = Graphs(f"{prefix}fp32/{GraphKind.SCORING.file_name}", f"{prefix}fp32/{GraphKind.DECODE.file_name}")
    return Export(graphs, result["io"], result["parity"], result["seconds"])


def quantize_step(variant: str, size: Size, export: Export, inputs: TaskInputs, root: Path, prefix: str,
                  cache: StepCache, log) -> Quantized:
    """Both graphs of one registry variant, each accepted or not against its budget on the validation split."""
    settings = QuantizeSettings(precision=variant, on_budget_fail="report")
    key = content_key(step="quantize", model=size.model_sha256, tokens=tokens_sha256(inputs.validation),
                      calibration=tokens_sha256(inputs.calibration), settings=settings.to_dict(), tools=tool_versions())
    result = cache.fetch(f"quantize-{variant}", key, root / prefix)
    if result is None:
        log(f"quantizing to {variant} and checking it on the validation split")
        start, reports = time.perf_counter(), {}
        for kind in GraphKind:
            _, rep = quantize_mod.quantize(root / getattr(export.graphs, kind.key), settings,
                                           root / prefix / variant / kind.file_name, calibration=inputs.calibration,
                                           heldout=inputs.validation, model=size.model)
            reports[kind.key] = {"line": rep.get("line"), "calibration_sha256": (rep.get("calibration") or {}).get("sha256"),
                                 "validation_sha256": (rep.get("validation") or {}).get("sha256"),
                                 "bits_per_dim": rep["bits_per_dim"], "float_layers": rep.get("float_layers")}
        result = {"files": [f"{variant}/{k.file_name}" for k in GraphKind], "reports": reports,
                  "seconds": time.perf_counter() - start}
        cache.store(f"quantize-{variant}", key, root / prefix, result)
    else:
        log(f"{variant}: reused the cached graphs (saved {result['seconds']:.1f}s)")
    reps = result["reports"]
    return Quantized(Graphs(*(f"{prefix}{variant}/{k.file_name}" for k in GraphKind)),
                     all(r["bits_per_dim"]["within_budget"] for r in reps.values()), reps, result["seconds"])


def build_size(plan, size: Size, inputs: TaskInputs, root: Path, cache: StepCache, log) -> SizeBuild:
    """One size: its export, every planned variant, and its goldens (test-split tokens + PyTorch bits)."""
    prefix = "" if size.main else f"{LADDER_FOLDER}/{size.name}/"
    (root / prefix).mkdir(parents=True, exist_ok=True)
    export = export_step(size, inputs, root, prefix, cache, log)
    quantized = {v: quantize_step(v, size, export, inputs, root, prefix, cache, log)
                 for v in plan.built if v != "fp32"}
    np.savez(root / f"{prefix}goldens.npz", tokens=inputs.goldens, ref_bits=size.ref_bits)
    return SizeBuild(size, prefix, export, quantized)


_BUILD_SCRIPT = """#!/usr/bin/env bash
# Builds both TensorRT engines of this bundle on the device, then records them (TensorRT version,
# device, sha256, a test inference on the goldens) beside each plan: the runtime uses a device-built
# engine only with its record. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")"
bash engine/build_engine.sh
bash engine_decode/build_engine.sh
"${PYTHON:-python3}" -m projectable_edge_runtime.bundle.engine_record .
"""


def compile_step(profile: DeviceProfile, root: Path, graphs: Graphs, variant: str, log) -> tuple[Engine, dict]:
    """Compile (or defer) both graphs of the selected variant for the target: (the manifest's engine, summaries).
    A TensorRT build script points at the variant's own graphs: nothing ships twice."""
    trt = profile.compile_backend == CompileBackend.TENSORRT
    base = "engine" if trt else "ort"
    reports = {}
    for kind, folder in ((GraphKind.SCORING.key, base), (GraphKind.DECODE.key, f"{base}_decode")):
        log(f"compiling {variant} {kind} graph for {profile.name} ({profile.compile_backend})")
        _, reports[kind] = compile_for_target(root / getattr(graphs, kind), profile, root / folder, log=log,
                                              copy_onnx=False)
    summaries = {k: {f: r.get(f) for f in ("status", "reason", "command_line")} for k, r in reports.items()}
    if not trt:
        return Engine(EngineStatus.NOT_APPLICABLE, f"{profile.name} runs ONNX Runtime; ort/ holds the "
                      "offline-optimized and .ort graphs", variant=variant,
                      ort={k: r.get("files") for k, r in reports.items()}), summaries
    (root / "build_engine.sh").write_text(_BUILD_SCRIPT)
    os.chmod(root / "build_engine.sh", 0o755)
    r, d = reports["score"], reports["decode"]
    plans = (f"engine/{r['engine']}", f"engine_decode/{d['engine']}")
    host_built = r["tensorrt_version_host"] and r["status"] == EngineStatus.BUILT
    return Engine(EngineStatus(r["status"]), r["reason"], variant=variant, path=plans[0], decode_path=plans[1],
                  command="bash build_engine.sh", trtexec=r["command_line"], trtexec_decode=d["command_line"],
                  tensorrt_version=r["tensorrt_version_host"] or r["tensorrt_version_expected"],
                  tensorrt_version_source="host build" if host_built else "profile (a device build records its own)",
                  typing=r["typing"], shapes={"score": r["shapes"], "decode": d["shapes"]},
                  records={p: p + ENGINE_RECORD_SUFFIX for p in plans},
                  trt_check={k: reports[k]["trt_check"]["ok"] for k in reports}), summaries
