"""`generate` in one pass: plan -> read -> build -> measure -> select + compile -> report -> seal once."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from projectable_edge.pipeline import measure as meas
from projectable_edge.pipeline.build import build_size, compile_step, tool_versions
from projectable_edge.pipeline.cache import StepCache
from projectable_edge.pipeline.inputs import prepare
from projectable_edge.pipeline.plan import GenerateSettings, Plan, make_plan
from projectable_edge.pipeline.report import write_report
from projectable_edge.pipeline.wheel import graph_requires, write_runtime_wheel
from projectable_edge_runtime.bundle.manifest import (SCHEMA_VERSION, Engine, EngineStatus, Exercised, Manifest, Task,
                                                      staged_bundle, write_manifest)
from projectable_edge_runtime.devices.choices import CompileBackend, host_arch
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec


def exercised(plan: Plan, engine: Engine, n_candidates: int, ladder: bool) -> Exercised:
    """Say plainly what this host ran and what it could not."""
    name = plan.profile.name
    converted = [v for v in plan.built if v != "fp32"]
    done = ["projection", "ONNX export + parity vs PyTorch on the validation split (onnxruntime CPU)"]
    if converted:
        done.append(f"quantization, accepted on the validation split: {', '.join(converted)}")
    done.append(f"{n_candidates} candidate(s) validated against the PyTorch reference on the goldens (test split) "
                "and timed, each in its own torch-free runtime process (onnxruntime CPU)")
    not_done = []
    if engine.status == EngineStatus.DEFERRED:
        not_done.append("TensorRT engine build: tensorrt not importable on this host; run build_engine.sh on the "
                        + name)
    elif engine.status == EngineStatus.NOT_APPLICABLE:
        done.append("ONNX Runtime offline optimization + .ort conversion (files in ort/, for ORT minimal/mobile "
                    "builds; the runtime loads the standard .onnx graphs)")
    if engine.status == EngineStatus.DEFERRED or plan.profile.arch != host_arch():
        not_done.append(f"latency on the {name} itself: run `python -m projectable_edge_runtime benchmark` there")
    if ladder:
        not_done.append(f"device latency of the candidates: ESTIMATED from {name}'s published peaks; run "
                        "`python -m projectable_edge_runtime tune BUNDLE` on the device to measure them and pick one")
    return Exercised(tuple(done), tuple(not_done))


def generate(settings: GenerateSettings, log=print) -> tuple[Path, Manifest]:
    """Write one bundle for one task and target; returns its path and manifest. A bad target, precision, run or
    task fails before anything is written; the rest is staged in a folder renamed into place at the end."""
    start = time.perf_counter()
    plan = make_plan(settings.resolved())
    s = plan.settings
    inputs, sizes = prepare(plan, log)
    out = Path(s.out) if s.out else Path("bundles").resolve() / f"{inputs.task_name}__{plan.profile.name}"
    cache = StepCache((Path(s.cache_dir) if s.cache_dir else out.parent / ".cache") if s.cache else None)
    with staged_bundle(out, overwrite=s.overwrite) as tmp:
        builds = [build_size(plan, size, inputs, tmp, cache, log) for size in sizes]
        drafts = {n: c for cands, _, _ in builds for n, c in cands.items()}
        requires = graph_requires(tmp, [p for c in drafts.values() for p in (c.graphs.score, c.graphs.decode)])
        wheel = write_runtime_wheel(tmp, cache, log)
        cands, raw = meas.measure(tmp, plan, inputs.meta["tokenizer"], drafts, log)
        # this host's timings speak for the target only when it runs ONNX Runtime on this architecture
        on_target = plan.profile.compile_backend == CompileBackend.ONNXRUNTIME and plan.profile.arch == host_arch()
        selected, selection = meas.select(plan, cands, on_target, meas.unbuildable(plan, tmp, cands))
        engine, summaries = compile_step(plan.profile, tmp, cands[selected].graphs, cands[selected].variant, log)
        cands, ladder = meas.ladder(plan, cands, raw) if s.ladder else (cands, None)
        _, export, quantized = builds[0]
        provenance = {
            "source_run": s.source, "source_config": {k: v for k, v in inputs.meta.items() if k != "weights_sha256"},
            "source_weights_sha256": inputs.meta["weights_sha256"], "projection_ms": sizes[0].projection_ms,
            "generate_settings": {**asdict(s), "sign_key": bool(s.sign_key)},
            "steps": {"export": export["parity"], "compile": summaries,
                      **{f"quantize_{v}": report for v, report in quantized.items()}},
            "splits": {"goldens": "test", "n_goldens": int(len(inputs.goldens)),
                       "quantization_and_parity": "val", "n_validation": int(len(inputs.validation))},
            "cache": cache.summary(), "generate_seconds": time.perf_counter() - start,
            **({"adapted": inputs.adapted} if inputs.adapted else {})}
        body = Manifest(
            schema_version=SCHEMA_VERSION, task=Task(inputs.task_name, inputs.task), target=plan.profile,
            tokenizer=TokenizerSpec.from_dict(inputs.meta["tokenizer"]), candidates=cands, selected=selected,
            selection=selection, engine=engine, requires=requires, task_test_bits=inputs.task_test_bits,
            runtime_wheel=wheel, ladder=ladder, io=export["io"], tools=tool_versions(), provenance=provenance,
            exercised=exercised(plan, engine, len(cands), ladder is not None))
        report = write_report(tmp, body, raw, log)
        body = replace(body, provenance={**provenance, "generate_seconds": time.perf_counter() - start})
        manifest = write_manifest(tmp, body, optional=report, sign_key=s.sign_key)
    if cache.hits:
        log(f"step cache: reused {', '.join(cache.hits)} (saved {cache.saved_seconds:.1f}s of building)")
    log(f"wrote {out} in {time.perf_counter() - start:.1f}s (selected {selected}, engine {engine.status})")
    return out, manifest
