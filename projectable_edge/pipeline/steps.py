"""The build passes of `generate`, each returning a typed result: export, quantize, select, compile.

Export and quantization are cached by content (model hash, tokens, settings, tool versions),
so a second target for the same task reuses them; compilation is per target and always runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import projectable_edge.exporters.quantize as quantize_mod
from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import CompileBackend
from projectable_edge_runtime.devices.profiles import DeviceProfile
from projectable_edge.exporters.onnx_export import REPORT_FILE, ExportSettings, export_onnx
from projectable_edge.exporters.onnx_io import tokens_sha256
from projectable_edge.exporters.quantize import QuantizeSettings
from projectable_edge.pipeline.cache import StepCache, content_key
from projectable_edge.pipeline.inputs import TaskInputs
from projectable_edge_runtime.graphs import GraphKind
from projectable_edge_runtime.manifest import RECORD_SUFFIX, EngineStatus, sha256_file

GRAPHS = tuple(GraphKind)


def tool_versions() -> dict[str, str]:
    import platform

    import onnx
    import onnxruntime
    import torch

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "host": platform.machine()}


@dataclass(frozen=True)
class ParityCheck:
    """One graph against the PyTorch model: every output within tolerance, and bits/dim on the goldens."""

    ok: bool
    onnx_bits: float
    pytorch_bits: float
    lines: list[str]

    @classmethod
    def of(cls, report: dict) -> "ParityCheck":
        b = report["bits_per_dim"]
        return cls(bool(report["ok"]), float(b["onnx"]), float(b["pytorch"]), list(report["lines"]))

    def summary(self) -> dict:
        return {"parity_ok": self.ok, "lines": self.lines}


@dataclass(frozen=True)
class ExportStep:
    files: dict[str, str]  # manifest graph key ("score"/"decode") -> path in the bundle
    io: dict[str, dict]  # graph kind -> its ExportSpec dict
    parity: dict[str, ParityCheck]  # graph kind -> its check
    seconds: float
    cached: bool

    @property
    def bits(self) -> float:
        """fp32 scoring graph bits/dim on the goldens (ONNX Runtime)."""
        return self.parity[str(GraphKind.SCORING)].onnx_bits


@dataclass(frozen=True)
class QuantizeStep:
    variant: str
    files: dict[str, str]  # manifest graph key -> path in the bundle
    bits: float  # scoring graph bits/dim on the goldens
    decode_bits: float  # the decode graph's, teacher-forced: a variant ships both, both must pass
    within_budget: bool
    budget_rel: float
    float_layers: dict
    summaries: dict[str, dict]  # manifest graph key -> {line, calibration_sha256, bits_per_dim}
    seconds: float
    cached: bool


@dataclass(frozen=True)
class Selection:
    selected: str
    reason: str
    built: list[str]
    rejected: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CompileStep:
    engine: dict  # the manifest's `engine` entry
    summaries: dict[str, dict]  # manifest graph key -> {status, reason, command_line}


def _export_result(report: dict, folder: str, seconds: float) -> dict:
    graphs = report["graphs"]
    return {"files": [f"{folder}/{e['file']}" for e in graphs.values()] + [f"{folder}/{REPORT_FILE}"],
            "graph_files": {GraphKind(g).key: f"{folder}/{e['file']}" for g, e in graphs.items()},
            "io": {g: e["spec"] for g, e in graphs.items()},
            "parity": {g: {k: e["parity"][k] for k in ("ok", "bits_per_dim", "lines")} for g, e in graphs.items()},
            "seconds": seconds}


def export_step(inputs: TaskInputs, tmp: Path, cache: StepCache, log) -> ExportStep:
    """fp32 scoring + decode graphs, parity-checked against the projected model on the goldens."""
    settings = ExportSettings()
    key = content_key(step="export", model=inputs.model_sha256, goldens=tokens_sha256(inputs.goldens),
                      settings=settings.to_dict(), tools=tool_versions())
    result = cache.fetch("export", key, tmp)
    cached = result is not None
    if result is None:
        log("exporting to ONNX (scoring + KV-cache decode) and checking parity")
        start = time.perf_counter()
        _, report = export_onnx(inputs.model, settings, tmp / "fp32", heldout=inputs.goldens)
        result = _export_result(report, "fp32", time.perf_counter() - start)
        cache.store("export", key, tmp, result)
    else:
        log(f"export: reused the cached fp32 graphs (saved {result['seconds']:.1f}s)")
    parity = {g: ParityCheck.of(r) for g, r in result["parity"].items()}
    return ExportStep(result["graph_files"], result["io"], parity, result["seconds"], cached)


def _quantize_one(src: Path, dst: Path, variant: str, inputs: TaskInputs) -> dict:
    settings = QuantizeSettings(precision=variant, on_budget_fail="report")
    _, rep = quantize_mod.quantize(src, settings, dst, calibration=inputs.calibration, heldout=inputs.goldens,
                                   model=inputs.model)
    b = rep["bits_per_dim"]
    return {"line": rep.get("line"), "calibration_sha256": (rep.get("calibration") or {}).get("sha256"),
            "bits_per_dim": b, "float_layers": rep.get("float_layers")}


def quantize_step(variant: str, export: ExportStep, inputs: TaskInputs, tmp: Path, cache: StepCache,
                  log) -> QuantizeStep:
    """Both graphs of one registry variant, each validated on the goldens against its budget."""
    settings = QuantizeSettings(precision=variant, on_budget_fail="report")
    key = content_key(step="quantize", model=inputs.model_sha256,
                      sources={k: sha256_file(tmp / f) for k, f in export.files.items()},
                      goldens=tokens_sha256(inputs.goldens),
                      calibration=tokens_sha256(inputs.calibration), settings=settings.to_dict(), tools=tool_versions())
    result = cache.fetch(f"quantize-{variant}", key, tmp)
    cached = result is not None
    if result is None:
        log(f"quantizing to {variant} and validating on held-out images")
        start = time.perf_counter()
        reps = {k.key: _quantize_one(tmp / export.files[k.key], tmp / variant / Path(export.files[k.key]).name,
                                     variant, inputs) for k in GRAPHS}
        files = {k: f"{variant}/{Path(export.files[k]).name}" for k in reps}
        result = {"files": list(files.values()), "graph_files": files, "reports": reps,
                  "seconds": time.perf_counter() - start}
        cache.store(f"quantize-{variant}", key, tmp, result)
    else:
        log(f"{variant}: reused the cached graphs (saved {result['seconds']:.1f}s)")
    reps = result["reports"]
    score, decode = reps[GraphKind.SCORING.key], reps[GraphKind.DECODE.key]
    return QuantizeStep(variant, result["graph_files"], score["bits_per_dim"]["variant"],
                        decode["bits_per_dim"]["variant"],
                        bool(score["bits_per_dim"]["within_budget"] and decode["bits_per_dim"]["within_budget"]),
                        score["bits_per_dim"]["budget_rel"], score["float_layers"],
                        {k: {f: r[f] for f in ("line", "calibration_sha256", "bits_per_dim")} for k, r in reps.items()},
                        result["seconds"], cached)


def select(plan_variants: tuple[str, ...], quantized: dict[str, QuantizeStep], precision: str,
           profile: DeviceProfile) -> Selection:
    """The first variant in the target's preference order that met its accuracy budget (else fp32)."""
    usable = [v for v in plan_variants if v == variants.FP32.name or (v in quantized and quantized[v].within_budget)]
    selected = usable[0] if usable else variants.FP32.name
    if precision != "auto":
        why = f"precision {precision} was asked for"
    elif usable:
        why = (f"first variant in {profile.name}'s precision order {list(profile.precisions)} "
               "that met its accuracy budget")
    else:
        why = "no variant of the profile's precisions met its accuracy budget: fell back to fp32"
    built = [variants.FP32.name] + [v for v in plan_variants if v != variants.FP32.name]
    rejected = {v: "accuracy budget exceeded" for v in plan_variants if v in quantized and v not in usable}
    return Selection(selected, why, built, rejected)


def compile_step(profile: DeviceProfile, tmp: Path, files: dict[str, str], variant: str, log) -> CompileStep:
    """Compile (or defer) both graphs of the selected variant for the target."""
    from projectable_edge.exporters.compile import compile_for_target

    trt = profile.compile_backend == CompileBackend.TENSORRT
    base = "engine" if trt else "ort"
    reports = {}
    for kind, folder in ((GraphKind.SCORING.key, base), (GraphKind.DECODE.key, f"{base}_decode")):
        log(f"compiling {variant} {kind} graph for {profile.name} ({profile.compile_backend})")
        _, reports[kind] = compile_for_target(tmp / files[kind], profile, tmp / folder, log=log)
    summaries = {k: {f: r.get(f) for f in ("status", "reason", "command_line")} for k, r in reports.items()}
    if not trt:
        return CompileStep({"status": str(EngineStatus.NOT_APPLICABLE), "variant": variant,
                            "reason": f"{profile.name} runs ONNX Runtime; ort/ holds the offline-optimized and .ort "
                                      "graphs", "ort": {k: reports[k].get("files") for k in reports}}, summaries)
    script = tmp / "build_engine.sh"
    script.write_text("#!/usr/bin/env bash\n# Builds both TensorRT engines of this bundle on the device, then records\n"
                      "# them (TensorRT version, device, sha256, a test inference on the goldens) beside each plan:\n"
                      "# the runtime uses a device-built engine only with its record. Run from anywhere.\n"
                      "set -euo pipefail\ncd \"$(dirname \"$0\")\"\n"
                      "bash engine/build_engine.sh\nbash engine_decode/build_engine.sh\n"
                      "\"${PYTHON:-python3}\" -m projectable_edge_runtime.engine_record .\n")
    script.chmod(0o755)
    r, d = reports["score"], reports["decode"]
    return CompileStep({"status": r["status"], "variant": variant, "path": f"engine/{r['engine']}",
                        "decode_path": f"engine_decode/{d['engine']}", "command": "bash build_engine.sh",
                        "trtexec": r["command_line"], "trtexec_decode": d["command_line"],
                        "tensorrt_version": r["tensorrt_version_host"] or r["tensorrt_version_expected"],
                        "tensorrt_version_source": "host build" if r["tensorrt_version_host"] and
                        r["status"] == EngineStatus.BUILT else "profile (a device build records its own)",
                        "typing": r["typing"], "shapes": {"score": r["shapes"], "decode": d["shapes"]},
                        "records": {p: p + RECORD_SUFFIX for p in (f"engine/{r['engine']}",
                                                                   f"engine_decode/{d['engine']}")},
                        "reason": r["reason"], "trt_check": {k: reports[k]["trt_check"]["ok"] for k in reports}},
                       summaries)
