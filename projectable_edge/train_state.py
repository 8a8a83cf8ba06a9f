"""What a run keeps while it trains: best-validation snapshots, resumable state, a progress bar.

The state file holds the model, every optimizer's moments and the best snapshots, so
`train --resume` continues exactly where an interrupted run stopped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from projectable_edge.checkpoint import load_tensors, save_tensors
from projectable_edge.trainables import Trainables


def snapshot(model: Trainables, role: str) -> dict[str, torch.Tensor]:
    """The parameters a role's best checkpoint must keep (projected needs source + operator).

    Every projected size shares the one source, so the main projected role's snapshot keeps every
    ladder projector too: all projected sizes ship from the main size's best step.
    """
    prefix = model.role_prefixes(role)
    if role == "projected":
        prefix += tuple(f"ladder.{n}.projector." for n in model.ladder)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def save_state(path: Path, model, opts, best, step: int) -> None:
    t = {f"model/{k}": v for k, v in model.state_dict().items()}
    for role, snap in best.items():
        t.update({f"best/{role}/{k}": v for k, v in snap["weights"].items()})
        t[f"bestval/{role}"] = torch.tensor(snap["val"])
        t[f"beststep/{role}"] = torch.tensor(snap["step"])
    names = {id(p): n for n, p in model.named_parameters()}
    for oname, opt in opts.items():
        for p, st in opt.state.items():
            for k, v in st.items():
                t[f"opt/{oname}/{names[id(p)]}/{k}"] = torch.as_tensor(v)
    t["step"] = torch.tensor(step)
    save_tensors(path, t, kind="train-state")


def load_state(path: Path, model, opts, best) -> int:
    t = load_tensors(path, kind="train-state")
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model/")})
    params = dict(model.named_parameters())
    for key, v in t.items():
        parts = key.split("/")
        if parts[0] == "opt":
            p = params[parts[2]]
            opts[parts[1]].state[p][parts[3]] = v if parts[3] == "step" else v.to(p.device)
        elif parts[0] == "bestval":
            best[parts[1]] = {"val": float(v), "step": int(t[f"beststep/{parts[1]}"]), "weights": {}}
    for key, v in t.items():
        parts = key.split("/", 2)
        if parts[0] == "best":
            best[parts[1]]["weights"][parts[2]] = v
    return int(t["step"])


class Progress:
    """A rich progress bar (or nothing), showing the latest validation bits/dim."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.p = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.p = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              TextColumn("{task.fields[info]}"), transient=False)
            self.p.start()
            self.task = self.p.add_task("train", total=total, completed=start, info="")

    def update(self, done: int, macro: dict) -> None:
        if self.p:
            info = " ".join(f"{k[:4]} {v:.3f}" for k, v in macro.items() if "@" not in k)
            self.p.update(self.task, completed=done, info=f"val bits/dim: {info}")

    def close(self) -> None:
        if self.p:
            self.p.stop()
