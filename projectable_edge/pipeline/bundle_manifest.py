"""The bundle's manifest (the runtime's typed `Manifest`), assembled once from the typed step results."""

from __future__ import annotations

from dataclasses import asdict

from projectable_edge.pipeline.build import SizeBuild, tool_versions
from projectable_edge.pipeline.cache import StepCache
from projectable_edge.pipeline.inputs import TaskInputs
from projectable_edge.pipeline.plan import Plan
from projectable_edge_runtime.devices.choices import host_arch
from projectable_edge_runtime.manifest import (SCHEMA_VERSION, Candidate, Engine, EngineStatus, Exercised, Ladder,
                                               Manifest, Requires, Selection, Task, Wheel)
from projectable_edge_runtime.tokenizer import TokenizerSpec


def exercised(plan: Plan, engine: Engine, cands: dict[str, Candidate], ladder: Ladder | None) -> Exercised:
    """Say plainly what this host ran and what it could not."""
    name = plan.profile.name
    converted = [v for v in plan.built if v != "fp32"]
    done = ["projection", "ONNX export + parity vs PyTorch on the validation split (onnxruntime CPU)"]
    if converted:
        done.append(f"quantization, accepted on the validation split: {', '.join(converted)}")
    done.append(f"{len(cands)} candidate(s) validated against the PyTorch reference on the goldens (test split) and "
                "timed, each in its own torch-free runtime process (onnxruntime CPU)")
    not_done = []
    if engine.status == EngineStatus.DEFERRED:
        not_done.append(f"TensorRT engine build: tensorrt not importable on this host; run build_engine.sh on the {name}")
    elif engine.status == EngineStatus.NOT_APPLICABLE:
        done.append("ONNX Runtime offline optimization + .ort conversion (files in ort/, for ORT minimal/mobile "
                    "builds; the runtime loads the standard .onnx graphs)")
    if engine.status == EngineStatus.DEFERRED or plan.profile.arch != host_arch():
        not_done.append(f"latency on the {name} itself: run `python -m projectable_edge_runtime benchmark` there")
    if ladder is not None:
        not_done.append(f"device latency of the candidates: ESTIMATED from {name}'s published peaks; run "
                        "`python -m projectable_edge_runtime tune BUNDLE` on the device to measure them and pick one")
    return Exercised(tuple(done), tuple(not_done))


def build_manifest(plan: Plan, inputs: TaskInputs, builds: list[SizeBuild], cands: dict[str, Candidate],
                   selected: str, selection: Selection, engine: Engine, compile_summaries: dict,
                   requires: Requires, wheel: Wheel | None, ladder: Ladder | None, cache: StepCache,
                   seconds: float) -> Manifest:
    main = builds[0]
    steps = {"export": main.export.parity, "compile": compile_summaries,
             **{f"quantize_{v}": q.report for v, q in main.quantized.items()}}
    s = plan.settings
    provenance = {"source_run": s.source, "source_config": {k: v for k, v in inputs.meta.items() if k != "weights_sha256"},
                  "source_weights_sha256": inputs.meta["weights_sha256"], "projection_ms": main.size.projection_ms,
                  "generate_settings": {**asdict(s), "sign_key": bool(s.sign_key)}, "steps": steps,
                  "splits": {"goldens": "test", "n_goldens": int(len(inputs.goldens)),
                             "quantization_and_parity": "val", "n_validation": int(len(inputs.validation))},
                  "cache": cache.summary(), "generate_seconds": seconds,
                  **({"adapted": inputs.adapted} if inputs.adapted else {})}
    return Manifest(
        schema_version=SCHEMA_VERSION, task=Task(inputs.task_name, inputs.task), target=plan.profile,
        tokenizer=TokenizerSpec.from_dict(inputs.meta["tokenizer"]), candidates=cands, selected=selected,
        selection=selection, engine=engine, requires=requires, task_test_bits=inputs.task_test_bits,
        runtime_wheel=wheel, ladder=ladder, io=main.export.io, tools=tool_versions(), provenance=provenance,
        exercised=exercised(plan, engine, cands, ladder))
