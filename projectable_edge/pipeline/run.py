"""`generate` in one pass: plan -> read -> build -> measure -> select + compile -> report -> seal once."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from projectable_edge.pipeline import measure as meas
from projectable_edge.pipeline.build import build_size, compile_step
from projectable_edge.pipeline.bundle_manifest import build_manifest
from projectable_edge.pipeline.cache import StepCache
from projectable_edge.pipeline.inputs import prepare
from projectable_edge.pipeline.plan import GenerateSettings, make_plan
from projectable_edge.pipeline.report import write_report
from projectable_edge.pipeline.wheel import graph_requires, write_runtime_wheel
from projectable_edge_runtime.manifest import Manifest, staged_bundle, write_manifest


def generate(settings: GenerateSettings, log=print) -> tuple[Path, Manifest]:
    """Write one bundle for one task and target; returns its path and manifest.

    A bad target, precision, run or task fails before anything is written; everything else is built in a
    staging folder renamed into place at the end, so a failed run leaves no bundle. The run's weights are
    read once, the dataset and the baseline roles not at all (unless --references or --ladder need them);
    every candidate is measured once, and the manifest is written and sealed once.
    """
    start = time.perf_counter()
    plan = make_plan(settings.resolved())
    inputs, sizes = prepare(plan, log)
    out = plan.out_dir(inputs.task_name)
    cache = StepCache(plan.cache_dir(out))
    with staged_bundle(out, overwrite=plan.settings.overwrite) as tmp:
        builds = [build_size(plan, s, inputs, tmp, cache, log) for s in sizes]
        drafts = meas.draft(plan, builds)
        requires = graph_requires(tmp, [p for c in drafts.values() for p in (c.graphs.score, c.graphs.decode)])
        wheel = write_runtime_wheel(tmp, cache, log)
        raw = meas.measure_candidates(tmp, plan, inputs.meta["tokenizer"], drafts, log)
        cands = meas.fill(drafts, raw)
        selected, selection = meas.select(plan, cands, meas.host_is_target(plan), meas.unbuildable(plan, tmp, cands))
        engine, summaries = compile_step(plan.profile, tmp, cands[selected].graphs, cands[selected].variant, log)
        ladder = None
        if plan.settings.ladder:
            cands, ladder = meas.ladder(plan, cands, raw)
        body = build_manifest(plan, inputs, builds, cands, selected, selection, engine, summaries, requires, wheel,
                              ladder, cache, time.perf_counter() - start)
        report = write_report(tmp, body, raw, log)
        body = replace(body, provenance={**body.provenance, "generate_seconds": time.perf_counter() - start})
        manifest = write_manifest(tmp, body, optional=report, sign_key=plan.settings.sign_key)
    if cache.hits:
        log(f"step cache: reused {', '.join(cache.hits)} (saved {cache.saved_seconds:.1f}s of building)")
    log(f"wrote {out} in {time.perf_counter() - start:.1f}s (selected {selected}, engine {engine.status})")
    return out, manifest
