"""Everything one run trains, in one nn.Module so DDP can wrap it.

Roles (each a deployable small model per task, except the source):
- source:    M, the large task-conditioned model (its task embedding is the BOS vector);
- projected: P_t = project(M, t) through the Projector;
- universal: the small architecture trained directly on all tasks with its own task embedding;
- scratch:   one small model per task (weights stacked on a leading [n_task] dim; Adam is
             element-wise, so this is exactly n_task independent models trained in one pass).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from projectable_edge.model import ModelConfig, Weights, forward, init_weights, nll
from projectable_edge.projection import ProjectionConfig, Projector

ROLES = ("source", "projected", "universal", "scratch")


class WeightSet(nn.Module):
    """A flat dict of named weights as parameters ('.' in names is not allowed by torch)."""

    def __init__(self, weights: Weights):
        super().__init__()
        self.names = list(weights)
        for n, w in weights.items():
            self.register_parameter(n.replace(".", "__"), nn.Parameter(w))

    def weights(self) -> Weights:
        return {n: getattr(self, n.replace(".", "__")) for n in self.names}


def _stack_inits(cfg: ModelConfig, n: int, gen: torch.Generator) -> Weights:
    inits = [init_weights(cfg, gen) for _ in range(n)]
    return {k: torch.stack([w[k] for w in inits]) for k in inits[0]}


def _take(w: Weights, idx: torch.Tensor) -> Weights:
    return {k: v[idx] for k, v in w.items()}


class Trainables(nn.Module):
    def __init__(self, src: ModelConfig, small: ModelConfig, n_task: int, pcfg: ProjectionConfig, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.src_cfg, self.small_cfg, self.n_task = src, small, n_task
        self.source = WeightSet(init_weights(src, g))
        self.source_task = nn.Parameter(torch.randn(n_task, src.d_model, generator=g) * 0.02)
        self.projector = Projector(src, small, pcfg, g)
        self.universal = WeightSet(init_weights(small, g))
        self.universal_task = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)
        self.scratch = WeightSet(_stack_inits(small, n_task, g))
        self.scratch_bos = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)

    def projected_all(self) -> tuple[Weights, torch.Tensor]:
        """Project the source for every task at once: weights [n_task, ...], bos [n_task, d_s]."""
        return self.projector(self.source.weights(), self.source_task)

    def logits(self, role: str, tokens: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], task_ids [B] -> logits [B, T, V] of one role."""
        if role == "source":
            return forward(self.source.weights(), self.src_cfg, tokens, self.source_task[task_ids])
        if role == "projected":
            w, bos = self.projected_all()
            return forward(_take(w, task_ids), self.small_cfg, tokens, bos[task_ids])
        if role == "universal":
            return forward(self.universal.weights(), self.small_cfg, tokens, self.universal_task[task_ids])
        if role == "scratch":
            return forward(_take(self.scratch.weights(), task_ids), self.small_cfg, tokens, self.scratch_bos[task_ids])
        raise KeyError(role)

    def forward(self, tokens: torch.Tensor, task_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training losses (nats/token) of every role on one batch."""
        return {r: nll(self.logits(r, tokens, task_ids), tokens) for r in ROLES}

    def role_params(self) -> dict[str, list[nn.Parameter]]:
        return {
            "source": list(self.source.parameters()) + [self.source_task],
            "projector": list(self.projector.parameters()),
            "universal": list(self.universal.parameters()) + [self.universal_task],
            "scratch": list(self.scratch.parameters()) + [self.scratch_bos],
        }

    def specialise(self, role: str, task: int) -> tuple[ModelConfig, Weights, torch.Tensor]:
        """One task's deployable model of a role: (config, weights, bos vector)."""
        with torch.no_grad():
            if role == "source":
                return self.src_cfg, dict(self.source.weights()), self.source_task[task]
            if role == "projected":
                w, bos = self.projector(self.source.weights(), self.source_task[task: task + 1])
                return self.small_cfg, {k: v[0] for k, v in w.items()}, bos[0]
            if role == "universal":
                return self.small_cfg, dict(self.universal.weights()), self.universal_task[task]
            if role == "scratch":
                return self.small_cfg, {k: v[task] for k, v in self.scratch.weights().items()}, self.scratch_bos[task]
        raise KeyError(role)
