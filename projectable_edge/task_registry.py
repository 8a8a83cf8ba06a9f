"""Tasks added to a finished run by `adapt`, kept beside it: RUN/tasks/<name>/{task.safetensors, task.json}.

The run's own weights are never rewritten. Each adapted task is one folder, written whole or not
at all (atomic_output), holding the projected role's fitted task embedding (and weight deltas when
the fit had any), the tokens of the images it was fitted to (its goldens and calibration set for
`generate`), and a JSON record: the images' sha256, the fit's settings, its curve and its numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from projectable_edge_runtime.bundle.atomic import atomic_output, probe_writable
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.adapt import Adapted, adapted_model
from projectable_edge.checkpoint import load_json, load_tensors, save_json, save_tensors
from projectable_edge.model import SpecialisedModel

ROLE = "projected"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class AdaptedTask:
    name: str
    adapted: Adapted
    tokens: np.ndarray  # [n, T]: every image it was fitted to, in the order given
    check: np.ndarray  # indices into tokens of the images held out for early stopping (may be empty)
    record: dict

    def model(self, trainables) -> SpecialisedModel:
        """Its deployable projected model: project(M, fitted embedding) (+ deltas when fitted)."""
        cfg, w, bos = adapted_model(trainables, ROLE, self.adapted)
        return SpecialisedModel(cfg, w, bos)

    def goldens(self) -> np.ndarray:
        """Images to check it on: the held-out ones, or all of them when none was held out."""
        return self.tokens[self.check] if len(self.check) else self.tokens


def tasks_dir(run: Path) -> Path:
    return Path(run) / "tasks"


def adapted_names(run: Path) -> list[str]:
    """Names of the run's adapted tasks (complete folders only), sorted."""
    d = tasks_dir(run)
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if (p / "task.json").is_file() and not p.name.startswith("."))


def check_name(name: str, trained: list[str], run: Path, force: bool) -> None:
    """A new task's name must be a plain folder name, not a trained task, and not taken (unless forced)."""
    if not _NAME.fullmatch(name or ""):  # not match: its $ also takes a trailing newline
        raise ProjectableEdgeError(f"task name {name!r} is not usable: use 1-64 letters, digits, '_', '-' or '.', "
                                   "starting with a letter or digit")
    if name in trained:
        raise ProjectableEdgeError(f"task name {name!r} clashes with a task the run was trained on "
                                   f"({', '.join(trained)}); choose another --name")
    if name.isdigit() and int(name) < len(trained):  # not in the list above: say why it clashes
        raise ProjectableEdgeError(f"task name {name!r} is also the index of the trained task {trained[int(name)]!r} "
                                   f"(a task is named by its name or index); choose another --name, not a number "
                                   f"below {len(trained)}")
    if (tasks_dir(run) / name).exists() and not force:
        raise ProjectableEdgeError(f"the run already has an adapted task {name!r}: choose another --name, or pass "
                                   "--force to replace it")


def check_writable(run: Path) -> None:
    """adapt writes RUN/tasks/<name>/: a run folder this user cannot write is refused before the fit, not after."""
    folder = tasks_dir(run) if tasks_dir(run).is_dir() else Path(run)
    try:
        probe_writable(folder)
    except OSError as e:
        raise ProjectableEdgeError(f"cannot add a task to the run {run}: {folder} is not writable "
                                   f"({e.strerror or e}); copy the run folder somewhere you can write and adapt "
                                   "the copy, or fix the folder's permissions") from None


def register(run: Path, name: str, adapted: Adapted, tokens: np.ndarray, check: np.ndarray, record: dict,
             overwrite: bool = False) -> Path:
    """Write RUN/tasks/<name>/ whole (or nothing): weights, tokens and the JSON record."""
    tensors = {"vector": adapted.vector, "tokens": torch.as_tensor(tokens, dtype=torch.long),
               "check": torch.as_tensor(check, dtype=torch.long)}
    tensors.update({f"delta/{k}": v for k, v in adapted.deltas.items()})
    dest = tasks_dir(run) / name
    with atomic_output(dest, directory=True, overwrite=overwrite, what="adapted task", mark="task.json",
                       flag="--force (force=True in Python)") as tmp:
        save_tensors(tmp / "task.safetensors", tensors, kind="adapted-task")
        save_json(tmp / "task.json", {"format": "projectable-edge-adapted-task", "name": name, "role": ROLE,
                                      "nearest": adapted.nearest, "seed": adapted.seed, **record})
    return dest


def load_adapted(run: Path, name: str) -> AdaptedTask:
    """One adapted task of a run, checked against the run's model sizes by the caller's projection."""
    d = tasks_dir(run) / name
    if not (d / "task.json").is_file():
        raise ProjectableEdgeError(f"the run has no adapted task {name!r} (adapted: "
                                   f"{', '.join(adapted_names(run)) or 'none'}); create it with `adapt`")
    rec = load_json(d / "task.json", "an adapted task written by `projectable-edge adapt` (redo it with --force)")
    if rec.get("format") != "projectable-edge-adapted-task":
        raise ProjectableEdgeError(f"{d / 'task.json'} is not an adapted-task record")
    t = load_tensors(d / "task.safetensors", kind="adapted-task")
    deltas = {k[len("delta/"):]: v for k, v in t.items() if k.startswith("delta/")}
    a = Adapted(role=ROLE, vector=t["vector"], deltas=deltas, nearest=rec["nearest"],
                nearest_bits=rec["nearest_bits"], bits=rec["bits"], curve=rec.get("curve", []),
                seconds=rec.get("seconds", 0.0), seed=rec["seed"])
    return AdaptedTask(name=name, adapted=a, tokens=t["tokens"].numpy(), check=t["check"].numpy(), record=rec)


def lookup_task(run: Path, data, task: str | int) -> int | AdaptedTask:
    """A trained task's index, or an adapted task by name; the error lists both kinds."""
    try:
        return data.task_index(task)
    except ProjectableEdgeError as e:
        names = adapted_names(run)
        if isinstance(task, str) and task in names:
            return load_adapted(run, task)
        if names:
            raise ProjectableEdgeError(f"{e}; adapted tasks: {', '.join(names)}") from None
        raise
