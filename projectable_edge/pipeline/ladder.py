"""`generate --ladder`: every (size, precision) candidate of the run's size ladder in one bundle.

The main small size is built by the ordinary pipeline (top-level graphs, selection, compile); every
other size of the ladder costs one projection plus its export and quantization into ladder/SIZE/.
Each candidate carries its accuracy on the same goldens (vs its own fp32 graph and vs the universal
model of the same size), its host latency (own process, like `tune` on the device), and a labelled
estimate of its device latency (pipeline/estimate.py), which orders the candidates. `tune` on the
device makes the real choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from projectable_edge.project import n_params, specialise
from projectable_edge.pipeline import estimate as est
from projectable_edge.pipeline import steps
from projectable_edge.pipeline.bundle_manifest import model_facts
from projectable_edge.pipeline.cache import StepCache
from projectable_edge.pipeline.inputs import TaskInputs, model_sha256
from projectable_edge.pipeline.plan import Plan
from projectable_edge_runtime import tune
from projectable_edge_runtime.candidates import candidate_name
from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.errors import ProjectableEdgeError

FOLDER = "ladder"


@dataclass(frozen=True)
class SizeInputs:
    size: str  # "WIDTHxLAYERS"
    role: str  # "projected" or "projected@SIZE"
    main: bool
    inputs: TaskInputs  # the size's projected model, goldens (shared), ref bits
    universal_bits: float  # the same-size universal model on the same goldens (PyTorch)


@dataclass(frozen=True)
class SizeBuild:
    size: SizeInputs
    prefix: str  # "" for the main size, "ladder/SIZE/" otherwise
    export: steps.ExportStep
    quantized: dict[str, steps.QuantizeStep]


def _size_name(cfg) -> str:
    return f"{cfg.d_model}x{cfg.n_layer}"


def _rung_inputs(source: str, main: TaskInputs, trainables, role: str, test: np.ndarray, n_tasks: int,
                 log) -> TaskInputs:
    """A ladder size's inputs: the main task's data, this size's projected model and references."""
    from projectable_edge.evaluate import role_bits

    start = time.perf_counter()
    small = specialise(trainables, role, main.task)
    ms = (time.perf_counter() - start) * 1000
    log(f"projected task {main.task_name} at size {role.split('@')[1]} in {ms:.2f} ms ({n_params(small):,} params)")
    uni = role.replace("projected", "universal", 1)
    tasks = np.full(len(test), main.task)
    ref = role_bits(Path(source), trainables, test, tasks, n_tasks, roles=(role, uni))
    return replace(main, model=small, model_sha256=model_sha256(small), n_params=n_params(small), projection_ms=ms,
                   ref_bits=small.bits(main.goldens),
                   reference={"projected": float(ref[role][main.task]), "universal": float(ref[uni][main.task])})


def prepare_sizes(source: str, main: TaskInputs, log) -> list[SizeInputs]:
    """Every size of the run's ladder, the main one first; fails (before anything is written) on a run
    without a ladder or a task the ladder cannot serve."""
    from projectable_edge.train import load_run

    if main.task is None:
        raise ProjectableEdgeError(f"task {main.task_name!r} was added by `adapt` and exists for the main size "
                                   "only; generate it without --ladder")
    _, trainables, data = load_run(Path(source))
    rungs = list(trainables.ladder)
    if not rungs:
        raise ProjectableEdgeError(f"run {source} has no size ladder; train it with `--ladder 16,64` (extra small "
                                   "sizes) or generate without --ladder")
    test = data.split("test", main.task)
    out = [SizeInputs(_size_name(main.model.cfg), "projected", True, main,
                      float(specialise(trainables, "universal", main.task).bits(main.goldens).mean()))]
    for name in rungs:
        role = f"projected@{name}"
        inputs = _rung_inputs(source, main, trainables, role, test, data.n_tasks, log)
        uni = specialise(trainables, f"universal@{name}", main.task)
        out.append(SizeInputs(name, role, False, inputs, float(uni.bits(main.goldens).mean())))
    return out


def build_size(plan: Plan, size: SizeInputs, tmp: Path, cache: StepCache, log) -> SizeBuild:
    """Export and quantize one extra size into ladder/SIZE/ (cached by content like the main size)."""
    prefix = f"{FOLDER}/{size.size}/"
    root = tmp / prefix
    root.mkdir(parents=True, exist_ok=True)
    converted = ", ".join(v for v in plan.variants if v != variants.FP32.name) or "fp32 only"
    log(f"ladder size {size.size}: export + {converted}")
    export = steps.export_step(size.inputs, root, cache, log)
    quantized = {v: steps.quantize_step(v, export, size.inputs, root, cache, log)
                 for v in plan.variants if v != variants.FP32.name}
    np.savez(root / "goldens.npz", tokens=size.inputs.goldens, ref_bits=size.inputs.ref_bits)
    return SizeBuild(size, prefix, export, quantized)


def main_build(size: SizeInputs, export: steps.ExportStep, quantized: dict[str, steps.QuantizeStep]) -> SizeBuild:
    return SizeBuild(size, "", export, quantized)


def _candidate(b: SizeBuild, variant: str) -> dict:
    """One candidate's manifest entry, before it is measured."""
    fp32_bits = b.export.bits
    q = b.quantized.get(variant)
    bits = fp32_bits if q is None else q.bits
    files = b.export.files if q is None else q.files
    inp = b.size.inputs
    return {"size": b.size.size, "variant": variant, "role": b.size.role, "main": b.size.main,
            "model": model_facts(inp),
            "graphs": {k: b.prefix + p for k, p in files.items()},
            "goldens": "goldens.npz" if b.size.main else f"{b.prefix}goldens.npz",
            "accuracy": {"bits": bits, "fp32_bits": fp32_bits, "vs_fp32": bits - fp32_bits,
                         "universal_bits": b.size.universal_bits, "vs_universal": bits - b.size.universal_bits,
                         "reference_bits": float(inp.ref_bits.mean()),
                         "within_budget": True if q is None else q.within_budget,
                         "tolerance": variants.DEVICE_DRIFT_REL * bits,
                         "task_test_bits": inp.reference},
            "cost": est.cost(inp.model.cfg, inp.n_params, variant)}


def candidates(plan: Plan, builds: list[SizeBuild]) -> dict[str, dict]:
    """Every (size, variant) the plan built, sizes in ladder order, variants in the target's order."""
    return {candidate_name(b.size.size, v): _candidate(b, v) for b in builds for v in plan.variants}


def graph_files(builds: list[SizeBuild]) -> list[str]:
    """Every graph of the extra sizes (for the manifest's `requires`)."""
    return [b.prefix + p for b in builds if not b.size.main
            for p in [*b.export.files.values(), *(f for q in b.quantized.values() for f in q.files.values())]]


@dataclass(frozen=True)
class LadderMeasure:
    candidates: dict[str, dict]  # with latency_host and estimate, ordered by estimated device latency
    ladder: dict  # the manifest's `ladder` field


def measure(tmp: Path, plan: Plan, manifest: dict, runs: int, log) -> LadderMeasure:
    """Time every candidate in its own runtime process (as `tune` will on the device), validate it, estimate
    its device latency, order by that estimate and make the host pick against the target's budgets."""
    import projectable_edge_runtime as runtime

    table = manifest["candidates"]
    measured = tune.measure_all(tmp, list(table), runs=runs, warmup=max(5, runs // 10), backend="onnxruntime", log=log)
    validation = {}
    for n in table:
        with runtime.load(tmp, candidate=n, backend="onnxruntime", tuned=False) as model:
            validation[n] = runtime.validate(model)["passed"]
    failed = [n for n, ok in validation.items() if not ok]
    if failed:
        raise ProjectableEdgeError(f"ladder candidates {failed} failed validation on their goldens; nothing was "
                                   "written")
    estimates = est.estimate({n: {**c["cost"], "variant": c["variant"]} for n, c in table.items()},
                             {n: measured[n]["p50_ms"] for n in table}, plan.profile)
    key = (lambda n: estimates["candidates"][n]["device_p50_ms"]) if plan.profile.performance else \
        (lambda n: measured[n]["p50_ms"])
    ordered = {}
    for n in sorted(table, key=key):
        m = measured[n]
        ordered[n] = {**table[n], "estimate": estimates["candidates"][n],
                      "latency_host": {"score_batch1": m["score_batch1"], "p50_ms": m["p50_ms"], "p99_ms": m["p99_ms"],
                                       "peak_rss_mb": m["peak_rss_mb"]}}
    budget = tune.Budget.of(manifest)
    verdict = tune.pick(ordered, measured, budget)
    ladder = {"sizes": list(dict.fromkeys(c["size"] for c in table.values())),
              "order": "by estimated device p50 latency, fastest first" if plan.profile.performance else
                       "by measured host p50 latency (the profile publishes no peaks to estimate from)",
              "estimate": {k: v for k, v in estimates.items() if k != "candidates"},
              "host_pick": {"choice": verdict["choice"], "fits": verdict["fits"], "closest": verdict.get("closest"),
                            "explanation": tune.explain(verdict), "budget": verdict["budget"],
                            "note": "measured on this host against the target's budgets; run `python -m "
                                    "projectable_edge_runtime tune BUNDLE` on the device for the real choice"},
              "measure": {"runs": runs, "warmup": max(5, runs // 10), "process": "one runtime process per candidate"}}
    return LadderMeasure(ordered, ladder)


def note_exercised(exercised: dict, manifest_ladder: dict, n_candidates: int, profile_name: str) -> dict:
    """Say what the ladder part ran here and what only the device can tell."""
    done = [*exercised["done"], f"size ladder: {n_candidates} candidates ({', '.join(manifest_ladder['sizes'])} x "
                                "precisions) validated and timed on this host, one runtime process each"]
    not_done = [*exercised["not_done"], f"device latency of the candidates: ESTIMATED from {profile_name}'s published "
                                        "peaks; run `python -m projectable_edge_runtime tune BUNDLE` on the device "
                                        "to measure them and pick one"]
    return {"done": done, "not_done": not_done}
