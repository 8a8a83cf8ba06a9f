"""What one task's bundle is built from, read once: the run (one read of its weights), the task's splits (the
run's own snapshot, never the data source) and its projected model at every size."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from projectable_edge.model import SpecialisedModel
from projectable_edge.pipeline.plan import Plan
from projectable_edge.project import adapted_provenance, n_params, specialise
from projectable_edge.task_registry import lookup_task
from projectable_edge.train import load_run, run_data
from projectable_edge_runtime.devices.errors import ProjectableEdgeError


@dataclass(frozen=True)
class TaskInputs:
    meta: dict  # the run's config.json, with `weights_sha256` of the one read of its weights
    task: int | None  # None for a task added by `adapt`
    task_name: str
    goldens: np.ndarray  # held-out test-split sequences shipped with the bundle: the accuracy rows
    validation: np.ndarray  # the validation split: every quantization decision (keep-ops, acceptance, parity)
    calibration: np.ndarray  # the training split: int8 calibration
    task_test_bits: dict[str, float]  # this task's whole test split, PyTorch, per role
    adapted: dict | None  # an adapted task's provenance (project.adapted_provenance)


@dataclass(frozen=True)
class Size:
    """One small size of the task: its projected model and its PyTorch references on the goldens."""

    name: str  # "WIDTHxLAYERS"
    role: str  # "projected" or "projected@SIZE"
    main: bool
    model: SpecialisedModel
    model_sha256: str  # of its weights and config: the cache key of everything built from it
    params: int
    projection_ms: float
    ref_bits: np.ndarray  # the fp32 PyTorch model's bits/dim of each golden
    universal_bits: float | None  # the same-size universal model on the goldens (ladder only)


def _size(trainables, role: str, t, goldens: np.ndarray, log, universal: str | None) -> Size:
    project = (lambda: specialise(trainables, role, t)) if isinstance(t, int) else (lambda: t.model(trainables))
    project()  # the first call also pays torch's lazy start-up: time the second
    start = time.perf_counter()
    small = project()
    ms = (time.perf_counter() - start) * 1000
    name = f"{small.cfg.d_model}x{small.cfg.n_layer}"
    log(f"projected task at size {name} in {ms:.2f} ms ({n_params(small):,} params)")
    h = hashlib.sha256(repr(sorted(small.cfg.to_dict().items())).encode())
    for key, tensor in sorted(small.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    uni = None if universal is None else float(specialise(trainables, universal, t).bits(goldens).mean())
    return Size(name, role, role == "projected", small, h.hexdigest(), n_params(small), ms, small.bits(goldens), uni)


def prepare(plan: Plan, log) -> tuple[TaskInputs, list[Size]]:
    """The task's inputs and its projection at every size (main first). Baseline roles are built only for
    --references (their test-split rows) or --ladder (`vs_universal`). A bad run or task fails here."""
    s = plan.settings
    run = Path(s.source)
    meta, trainables, _ = load_run(run, data=False, baselines=s.ladder or s.references)
    data = run_data(run, meta)
    t = lookup_task(run, data, s.task)
    adapted = not isinstance(t, int)
    if adapted and s.ladder:
        raise ProjectableEdgeError(f"task {t.name!r} was added by `adapt` and exists for the main size only; "
                                   "generate it without --ladder")
    if s.ladder and not trainables.ladder:
        raise ProjectableEdgeError(f"run {run} has no size ladder; train it with `--ladder 16,64` (extra small "
                                   "sizes) or generate without --ladder")
    if adapted:  # no splits of its own: its held-out images serve every check, its images calibrate
        test = validation = t.goldens()
        calibration = t.tokens
    else:
        test, validation, calibration = (data.split(k, t) for k in ("test", "val", "train"))
    goldens = test[:s.goldens]
    roles = ["projected", *(f"projected@{n}" for n in (trainables.ladder if s.ladder else ()))]
    sizes = [_size(trainables, r, t, goldens, log, r.replace("projected", "universal", 1) if s.ladder else None)
             for r in roles]
    task_test_bits = {"projected": float(sizes[0].model.bits(test).mean())}
    if s.references and not adapted:
        from projectable_edge.evaluate import role_bits

        rows = role_bits(run, trainables, test, np.full(len(test), t), data.n_tasks,
                         roles=("source", "projected", "universal", "scratch"))
        task_test_bits = {r: float(v[t]) for r, v in rows.items()}
    elif adapted:
        near = specialise(trainables, "projected", t.adapted.nearest)
        task_test_bits["nearest trained task (projected)"] = float(near.bits(test).mean())
    inputs = TaskInputs(meta, None if adapted else t, t.name if adapted else data.task_names[t], goldens, validation,
                        calibration, task_test_bits, adapted_provenance(t) if adapted else None)
    return inputs, sizes
