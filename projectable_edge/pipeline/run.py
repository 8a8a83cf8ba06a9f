"""`generate` reads as its four passes: plan -> build -> measure -> write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from projectable_edge_runtime.devices import variants
from projectable_edge.pipeline import ladder, steps
from projectable_edge.pipeline.bundle_manifest import build_manifest
from projectable_edge.pipeline.cache import StepCache
from projectable_edge.pipeline.inputs import TaskInputs, prepare
from projectable_edge.pipeline.measure import measure
from projectable_edge.pipeline.plan import GenerateSettings, Plan, make_plan
from projectable_edge.pipeline.report import write_report
from projectable_edge.pipeline.wheel import graph_requires, write_runtime_wheel
from projectable_edge_runtime.manifest import staged_bundle, write_manifest


@dataclass(frozen=True)
class Built:
    export: steps.ExportStep
    quantized: dict[str, steps.QuantizeStep]
    selection: steps.Selection
    compiled: steps.CompileStep


def build(plan: Plan, inputs: TaskInputs, tmp: Path, cache: StepCache, log) -> Built:
    """Export, quantize every planned variant, select one for the target, compile it, ship the goldens."""
    export = steps.export_step(inputs, tmp, cache, log)
    quantized = {v: steps.quantize_step(v, export, inputs, tmp, cache, log)
                 for v in plan.variants if v != variants.FP32.name}
    selection = steps.select(plan.variants, quantized, plan.settings.precision, plan.profile)
    files = export.files if selection.selected == variants.FP32.name else quantized[selection.selected].files
    compiled = steps.compile_step(plan.profile, tmp, files, selection.selected, log)
    np.savez(tmp / "goldens.npz", tokens=inputs.goldens, ref_bits=inputs.ref_bits)
    return Built(export, quantized, selection, compiled)


def _ladder_builds(plan: Plan, sizes: list, built: Built, tmp: Path, cache: StepCache, log) -> list:
    """The main size (already built) plus every extra size of the ladder; [] without --ladder."""
    if not sizes:
        return []
    main = ladder.main_build(sizes[0], built.export, built.quantized)
    return [main, *(ladder.build_size(plan, s, tmp, cache, log) for s in sizes[1:])]


def generate(settings: GenerateSettings, log=print) -> tuple[Path, dict]:
    """Write one bundle for one task and target; returns its path and manifest.

    A bad target, precision, run or task fails before anything is written; everything else is
    built in a staging folder renamed into place at the end, so a failed run leaves no bundle.
    """
    start = time.perf_counter()
    settings = settings.resolved()
    plan = make_plan(settings)
    inputs = prepare(settings.source, settings.task, settings.goldens, log)
    out = plan.out_dir(inputs.task_name)
    cache = StepCache(plan.cache_dir(out))
    sizes = ladder.prepare_sizes(settings.source, inputs, log) if settings.ladder else []
    with staged_bundle(out, overwrite=settings.overwrite) as tmp:
        built = build(plan, inputs, tmp, cache, log)
        builds = _ladder_builds(plan, sizes, built, tmp, cache, log)
        graph_files = [*built.export.files.values(), *(f for q in built.quantized.values() for f in q.files.values()),
                       *ladder.graph_files(builds)]
        device = {"requires": graph_requires(tmp, graph_files), "runtime_wheel": write_runtime_wheel(tmp, log)}
        if builds:
            device["candidates"] = ladder.candidates(plan, builds)
        parts = (plan, inputs, built.export, built.quantized, built.selection, built.compiled, cache)
        manifest = write_manifest(tmp, {**build_manifest(*parts), **device})
        measured = measure(tmp, built.selection.built, built.selection.selected, settings.bench_runs, log)
        if builds:
            lm = ladder.measure(tmp, plan, manifest, max(20, settings.bench_runs), log)
            device.update(candidates=lm.candidates, ladder=lm.ladder)
            manifest = {**manifest, **device}
        report = write_report(tmp, manifest, measured, settings.samples, log)
        body = build_manifest(*parts, measured, time.perf_counter() - start)
        if builds:
            body["exercised"] = ladder.note_exercised(body["exercised"], device["ladder"], len(device["candidates"]),
                                                      plan.profile.name)
        manifest = write_manifest(tmp, {**body, **device}, optional=report.files, sign_key=settings.sign_key)
    if cache.hits:
        log(f"step cache: reused {', '.join(cache.hits)} (saved {cache.saved_seconds:.1f}s of building)")
    log(f"wrote {out} in {time.perf_counter() - start:.1f}s (selected {built.selection.selected}, "
        f"engine {built.compiled.engine['status']})")
    return out, manifest
