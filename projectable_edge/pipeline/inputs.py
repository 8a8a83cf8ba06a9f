"""The one task's inputs to every later step: its projected model, goldens, calibration and references."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from projectable_edge.model import SpecialisedModel
from projectable_edge.project import adapted_provenance, n_params, specialise
from projectable_edge.task_registry import resolve
from projectable_edge.evaluate import role_bits
from projectable_edge.train import load_run
from projectable_edge_runtime.manifest import sha256_file


@dataclass(frozen=True)
class TaskInputs:
    meta: dict  # the run's config.json
    tokenizer: dict
    task: int | None  # None for a task added by `adapt`
    task_name: str
    model: SpecialisedModel
    model_sha256: str  # of its weights and config: the cache key of everything built from it
    n_params: int
    projection_ms: float
    goldens: np.ndarray  # held-out task sequences shipped with the bundle
    calibration: np.ndarray  # the task's training sequences
    ref_bits: np.ndarray  # PyTorch bits/dim of each golden
    reference: dict[str, float]  # this task's test bits/dim per role (source, projected, universal, scratch)
    source_sha256: str
    adapted: dict | None = None  # an adapted task's provenance (project.adapted_provenance)


def model_sha256(model: SpecialisedModel) -> str:
    h = hashlib.sha256(repr(sorted(model.cfg.to_dict().items())).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _reference(run: Path, trainables, test: np.ndarray, t: int, n_tasks: int) -> dict[str, float]:
    """This task's test bits/dim of each role: the same numbers as `evaluate`."""
    roles = role_bits(run, trainables, test, np.full(len(test), t), n_tasks,
                      roles=("source", "projected", "universal", "scratch"))
    return {r: float(v[t]) for r, v in roles.items()}


def prepare(source: str, task: str, n_goldens: int, log) -> TaskInputs:
    """Load the run, project the task (timed) and gather its data; fails on a bad run or task."""
    meta, trainables, data = load_run(Path(source))
    t = resolve(Path(source), data, task)
    adapted = not isinstance(t, int)
    start = time.perf_counter()
    small = t.model(trainables) if adapted else specialise(trainables, "projected", t)
    projection_ms = (time.perf_counter() - start) * 1000
    name = t.name if adapted else data.task_names[t]
    log(f"projected {'adapted ' if adapted else ''}task {name} in {projection_ms:.2f} ms ({n_params(small):,} params)")
    test = t.goldens() if adapted else data.split("test", t)
    goldens = test[:n_goldens]
    ref_bits = small.bits(goldens)
    reference = _adapted_reference(trainables, t, small) if adapted else \
        _reference(Path(source), trainables, test, t, data.n_tasks)
    return TaskInputs(meta=meta, tokenizer=data.spec.to_dict(), task=None if adapted else t, task_name=name,
                      model=small, model_sha256=model_sha256(small), n_params=n_params(small),
                      projection_ms=projection_ms, goldens=goldens,
                      calibration=t.tokens if adapted else data.split("train", t), ref_bits=ref_bits,
                      reference=reference, source_sha256=sha256_file(Path(source) / "model.safetensors"),
                      adapted=adapted_provenance(t) if adapted else None)


def _adapted_reference(trainables, t, small) -> dict[str, float]:
    """An adapted task has no test split: its held-out images, under it and under the nearest trained task."""
    near = specialise(trainables, "projected", t.adapted.nearest)
    return {"projected": float(small.bits(t.goldens()).mean()),
            "nearest trained task (projected)": float(near.bits(t.goldens()).mean())}
