"""The build passes of `generate`: export and quantize (cached by content), compile, goldens. Every decision
here (export parity, fp16 keep-ops, INT8 acceptance) uses the validation split; the test split only ships."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

import projectable_edge.exporters.quantize as quantize_mod
from projectable_edge.exporters.compile import compile_for_target
from projectable_edge.exporters.onnx_export import REPORT_FILE, ExportSettings, export_onnx
from projectable_edge.exporters.onnx_io import tokens_sha256
from projectable_edge.pipeline import estimate
from projectable_edge.pipeline.cache import StepCache, content_key
from projectable_edge.pipeline.inputs import Size, TaskInputs
from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import CompileBackend
from projectable_edge_runtime.devices.profiles import DeviceProfile
from projectable_edge_runtime.graphs.contract import GraphKind
from projectable_edge_runtime.bundle.manifest import (ENGINE_RECORD_SUFFIX, Accuracy, Candidate, Engine, EngineStatus,
                                                      Graphs, ModelFacts)

def tool_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "host": platform.machine()}


def export_step(size: Size, inputs: TaskInputs, dest: Path, cache: StepCache, log) -> dict:
    """fp32 scoring + decode graphs in dest/fp32, parity-checked against the projected model."""
    settings = ExportSettings()

    def build() -> dict:
        log("exporting to ONNX (scoring + KV-cache decode) and checking parity")
        graphs = export_onnx(size.model, settings, dest / "fp32", heldout=inputs.validation, log=log)[1]["graphs"]
        return {"files": [f"fp32/{e['file']}" for e in graphs.values()] + [f"fp32/{REPORT_FILE}"],
                "io": {g: e["spec"] for g, e in graphs.items()},
                "parity": {g: {k: e["parity"][k] for k in ("ok", "bits_per_dim", "lines")} for g, e in graphs.items()}}

    key = content_key(step="export", model=size.model_sha256, tokens=tokens_sha256(inputs.validation),
                      settings=settings.to_dict(), tools=tool_versions())
    return cache.run("export", key, dest, build, log, "export: reused the cached fp32 graphs")


def quantize_step(variant: str, size: Size, inputs: TaskInputs, dest: Path, cache: StepCache, log) -> dict:
    """Both graphs of one registry variant, each accepted or not against its budget: their reports by kind."""
    settings = quantize_mod.QuantizeSettings(precision=variant, on_budget_fail="report")

    def build() -> dict:
        log(f"quantizing to {variant} and checking it on the validation split")
        reports = {}
        for kind in GraphKind:
            _, rep = quantize_mod.quantize(dest / "fp32" / kind.file_name, settings, dest / variant / kind.file_name,
                                           calibration=inputs.calibration, heldout=inputs.validation, model=size.model)
            reports[kind.key] = {"line": rep.get("line"),
                                 "calibration_sha256": (rep.get("calibration") or {}).get("sha256"),
                                 "validation_sha256": (rep.get("validation") or {}).get("sha256"),
                                 "bits_per_dim": rep["bits_per_dim"], "float_layers": rep.get("float_layers")}
        return {"files": [f"{variant}/{k.file_name}" for k in GraphKind], "reports": reports}

    key = content_key(step="quantize", model=size.model_sha256, tokens=tokens_sha256(inputs.validation),
                      calibration=tokens_sha256(inputs.calibration), settings=settings.to_dict(), tools=tool_versions())
    return cache.run(f"quantize-{variant}", key, dest, build, log, f"{variant}: reused the cached graphs")["reports"]


def build_size(plan, size: Size, inputs: TaskInputs, root: Path, cache: StepCache, log):
    """One size built (its export, every planned variant, its goldens: test-split tokens + PyTorch bits):
    its candidates, not yet measured, preferred first; the export's result; the quantization reports."""
    prefix = "" if size.main else f"ladder/{size.name}/"
    (root / prefix).mkdir(parents=True, exist_ok=True)
    export = export_step(size, inputs, root / prefix, cache, log)
    quantized = {v: quantize_step(v, size, inputs, root / prefix, cache, log) for v in plan.built if v != "fp32"}
    np.savez(root / f"{prefix}goldens.npz", tokens=inputs.goldens, ref_bits=size.ref_bits)
    cfg, ref = size.model.cfg, float(size.ref_bits.mean())
    facts = ModelFacts(cfg.n_layer, cfg.n_head, cfg.head_dim, cfg.vocab_size, cfg.block_size, size.model.bos_id,
                       cfg.d_model, size.params)
    cands = {}
    for v in plan.built:
        q, rel = quantized.get(v), variants.get(v).tolerance_rel
        acc = Accuracy(reference_bits=ref, tolerance=rel * ref, tolerance_rel=rel, bits=None, passed=None, vs_fp32=None,
                       within_budget=q is None or all(r["bits_per_dim"]["within_budget"] for r in q.values()),
                       universal_bits=size.universal_bits, quantization=q)
        cands[f"{size.name}/{v}"] = Candidate(size.name, v, size.main, size.role, facts,
                                              Graphs(*(f"{prefix}{v}/{k.file_name}" for k in GraphKind)),
                                              f"{prefix}goldens.npz", acc, estimate.cost(cfg, size.params, v))
    return cands, export, quantized


_BUILD_SCRIPT = """#!/usr/bin/env bash
# Builds both TensorRT engines of this bundle on the device, then records them (TensorRT version,
# device, sha256, a test inference on the goldens) beside each plan: the runtime uses a device-built
# engine only with its record. Run from anywhere; PYTHON names the Python holding the bundle's runtime
# wheel (default python3).
set -euo pipefail
PY="${PYTHON:-python3}"
case "$PY" in */*) D="$(cd "$(dirname "$PY")" 2>/dev/null && pwd)" && PY="$D/${PY##*/}" ;; esac  # relative: before cd
cd "$(dirname "$0")"
if ! "$PY" -c 'import projectable_edge_runtime, tensorrt' 2>/dev/null; then
  echo "error: $PY cannot import projectable_edge_runtime and tensorrt, which test and record the engines" \
       "(a plan without its record stops the bundle from loading): run PYTHON=VENV/bin/python bash" \
       "build_engine.sh, VENV holding the bundle's runtime wheel and made with --system-site-packages" \
       "(JetPack's tensorrt); nothing was built" >&2
  exit 1
fi
bash engine/build_engine.sh
bash engine_decode/build_engine.sh
"$PY" -m projectable_edge_runtime.bundle.engine_record .
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
