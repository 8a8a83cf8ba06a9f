"""The bundle's manifest.json, built in one place from the typed step results."""

from __future__ import annotations

from dataclasses import asdict

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import host_arch
from projectable_edge_runtime.devices.variants import DEVICE_DRIFT_REL
from projectable_edge.pipeline.cache import StepCache
from projectable_edge.pipeline.inputs import TaskInputs
from projectable_edge.pipeline.measure import MeasureStep
from projectable_edge.pipeline.plan import Plan
from projectable_edge.pipeline.steps import CompileStep, ExportStep, QuantizeStep, Selection, tool_versions
from projectable_edge_runtime.manifest import EngineStatus


def accuracy(export: ExportStep, quantized: dict[str, QuantizeStep], inputs: TaskInputs) -> dict:
    """bits/dim of every variant on the goldens, vs fp32 and PyTorch, with its budget and device tolerance."""
    reference = float(inputs.ref_bits.mean())
    rows = {variants.FP32.name: {"bits": export.bits, "within_budget": True}}
    for v, q in quantized.items():
        rows[v] = {"bits": q.bits, "within_budget": q.within_budget, "budget_rel": q.budget_rel,
                   "float_layers": q.float_layers, "decode_bits": q.decode_bits}
    for a in rows.values():
        a.update(delta=a["bits"] - export.bits, delta_vs_pytorch=a["bits"] - reference,
                 tolerance=DEVICE_DRIFT_REL * a["bits"], tolerance_rel=DEVICE_DRIFT_REL)
    return {"reference_bits": reference, "tolerance": DEVICE_DRIFT_REL * reference,
            "tolerance_rel": DEVICE_DRIFT_REL, "n_goldens": int(len(inputs.goldens)), "variants": rows,
            "task_test_bits": inputs.reference}


def exercised(engine: dict, plan: Plan, built: list[str]) -> dict:
    """Say plainly what this host ran and what it could not."""
    profile = plan.profile
    done = ["projection", "ONNX export + parity vs PyTorch (onnxruntime CPU)"]
    if len(built) > 1:
        done.append(f"quantization + validation on held-out task images: {', '.join(v for v in built if v != 'fp32')}")
    done += ["runtime validation on goldens (onnxruntime CPU)", "host latency (python -m projectable_edge_runtime, onnxruntime CPU)"]
    not_done = []
    if engine["status"] == EngineStatus.DEFERRED:
        not_done.append("TensorRT engine build: tensorrt not importable on this host; run build_engine.sh on "
                        f"the {profile.name}")
    elif engine["status"] == EngineStatus.NOT_APPLICABLE:
        done.append("ONNX Runtime offline optimization + .ort conversion (files in ort/, for ORT minimal/mobile "
                    "builds; the runtime loads the standard .onnx graphs)")
    if engine["status"] == EngineStatus.DEFERRED or profile.arch != host_arch():
        not_done.append(f"latency on the {profile.name} itself: run `python -m projectable_edge_runtime benchmark` there")
    return {"done": done, "not_done": not_done}


def _steps(export: ExportStep, quantized: dict[str, QuantizeStep], compiled: CompileStep) -> dict:
    """The key numbers of each step (the export report ships in fp32/; the rest is summarised here)."""
    out = {"export": {g: p.summary() for g, p in export.parity.items()}}
    for v, q in quantized.items():
        out.update({f"quantize_{v}_{k}": s for k, s in q.summaries.items()})
    out["compile"] = compiled.summaries
    return out


def model_facts(inputs: TaskInputs) -> dict:
    """The manifest's `model` entry: what the runtime needs to feed the graphs (and the params count)."""
    m = inputs.model.cfg
    return {"n_layer": m.n_layer, "n_head": m.n_head, "head_dim": m.head_dim, "vocab_size": m.vocab_size,
            "block_size": m.block_size, "bos_id": inputs.model.bos_id, "d_model": m.d_model, "params": inputs.n_params}


def build_manifest(plan: Plan, inputs: TaskInputs, export: ExportStep, quantized: dict[str, QuantizeStep],
                   selection: Selection, compiled: CompileStep, cache: StepCache,
                   measured: MeasureStep | None = None, seconds: float | None = None) -> dict:
    files = {variants.FP32.name: export.files, **{v: q.files for v, q in quantized.items()}}
    provenance = {"source_run": str(plan.settings.source), "source_config": inputs.meta,
                  "source_weights_sha256": inputs.source_sha256, "projection_ms": inputs.projection_ms,
                  "generate_settings": {**asdict(plan.settings), "sign_key": bool(plan.settings.sign_key)}, "steps": _steps(export, quantized, compiled),
                  "cache": cache.summary()}
    if seconds is not None:
        provenance["generate_seconds"] = seconds
    if inputs.adapted:  # a task added by `adapt`: from how many images, fitted how
        provenance["adapted"] = inputs.adapted
    manifest = {
        "task": {"name": inputs.task_name, "index": inputs.task},
        "target": plan.profile.to_dict(),
        "tokenizer": inputs.tokenizer,
        "model": model_facts(inputs),
        "io": export.io,
        "graphs": files,
        "selected": selection.selected,
        "selection": {"reason": selection.reason, "built": selection.built, "rejected": selection.rejected},
        "engine": compiled.engine,
        "accuracy": accuracy(export, quantized, inputs),
        "latency_host": measured.latency if measured else {},
        "tools": tool_versions(),
        "provenance": provenance,
        "exercised": exercised(compiled.engine, plan, selection.built),
    }
    if measured is not None:
        manifest["validation_host"] = measured.validation
    return manifest
