"""Everything one run trains, in one nn.Module so DDP can wrap it.

Roles (each a deployable small model per task, except the source):
- source:    M, the large task-conditioned model (its task embedding is the BOS vector);
- projected: P_t = project(M, t) through the Projector;
- universal: the small architecture trained directly on all tasks with its own task embedding;
- scratch:   one small model per task (weights stacked on a leading [n_task] dim; Adam is
             element-wise, so this is exactly n_task independent models trained in one pass).

A run may also train a ladder of extra small sizes ("rungs"), each with its own projector and
its own equal-size universal baseline; their roles are named `projected@<size>` and
`universal@<size>` (e.g. `projected@16x4`). The plain names are the main small size.

Every role draws its initial weights from its own generator, seeded by (seed, role): adding a
rung or changing the operator's initialisation never moves another role's starting point.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.model import ModelConfig, Weights, forward, init_weights, nll
from projectable_edge.projection import ProjectionConfig, Projector

ROLES = ("source", "projected", "universal", "scratch")
LADDER_ROLES = ("projected", "universal")


def role_generator(seed: int, role: str) -> torch.Generator:
    """A generator that depends on (seed, role) only."""
    digest = hashlib.sha256(f"{seed}/{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def split_role(role: str) -> tuple[str, str | None]:
    """'projected@16x4' -> ('projected', '16x4'); 'universal' -> ('universal', None)."""
    base, _, size = role.partition("@")
    if base not in ROLES or (size and base not in LADDER_ROLES):
        raise ProjectableEdgeError(f"unknown model role {role!r}: use one of {', '.join(ROLES)}, "
                                   f"or {'/'.join(LADDER_ROLES)}@<size> for a ladder size")
    return base, size or None


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


class Rung(nn.Module):
    """One extra small size of the ladder: its projector and its equal-size universal model."""

    def __init__(self, src: ModelConfig, small: ModelConfig, n_task: int, pcfg: ProjectionConfig,
                 seed: int, name: str):
        super().__init__()
        self.cfg = small
        self.projector = Projector(src, small, pcfg, role_generator(seed, f"projected@{name}"))
        g = role_generator(seed, f"universal@{name}")
        self.universal = WeightSet(init_weights(small, g))
        self.universal_task = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)


class Trainables(nn.Module):
    def __init__(self, src: ModelConfig, small: ModelConfig, n_task: int, pcfg: ProjectionConfig, seed: int = 0,
                 ladder: dict[str, ModelConfig] | None = None):
        super().__init__()
        self.src_cfg, self.small_cfg, self.n_task = src, small, n_task
        g = role_generator(seed, "source")
        self.source = WeightSet(init_weights(src, g))
        self.source_task = nn.Parameter(torch.randn(n_task, src.d_model, generator=g) * 0.02)
        self.projector = Projector(src, small, pcfg, role_generator(seed, "projected"))
        g = role_generator(seed, "universal")
        self.universal = WeightSet(init_weights(small, g))
        self.universal_task = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)
        g = role_generator(seed, "scratch")
        self.scratch = WeightSet(_stack_inits(small, n_task, g))
        self.scratch_bos = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)
        self.ladder = nn.ModuleDict({name: Rung(src, cfg, n_task, pcfg, seed, name)
                                     for name, cfg in (ladder or {}).items()})

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES + tuple(f"{r}@{n}" for n in self.ladder for r in LADDER_ROLES)

    def config_of(self, role: str) -> ModelConfig:
        base, size = split_role(role)
        if base == "source":
            return self.src_cfg
        return self._rung(size).cfg if size else self.small_cfg

    def _rung(self, size: str) -> Rung:
        if size not in self.ladder:
            raise ProjectableEdgeError(f"this run has no ladder size {size!r}; its sizes are "
                                       f"{', '.join(self.ladder) or '(none: train with --ladder)'}")
        return self.ladder[size]

    def parts(self, role: str):
        """(projector or None, weights, task vectors) of a small role."""
        base, size = split_role(role)
        if size:
            rung = self._rung(size)
            return (rung.projector, None, None) if base == "projected" else \
                (None, rung.universal.weights(), rung.universal_task)
        if base == "projected":
            return self.projector, None, None
        if base == "universal":
            return None, self.universal.weights(), self.universal_task
        return None, self.scratch.weights(), self.scratch_bos

    def operator(self, role: str = "projected") -> Projector:
        """The projector behind a projected role (the main size's, or a ladder size's)."""
        projector = self.parts(role)[0]
        if projector is None:
            raise ProjectableEdgeError(f"role {role!r} is not a projected model; it has no operator")
        return projector

    def projected_all(self, role: str = "projected") -> tuple[Weights, torch.Tensor]:
        """Project the source for every task at once: weights [n_task, ...], bos [n_task, d_s]."""
        return self.operator(role)(self.source.weights(), self.source_task)

    def logits(self, role: str, tokens: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], task_ids [B] -> logits [B, T, V] of one role."""
        base, _ = split_role(role)
        if base == "source":
            return forward(self.source.weights(), self.src_cfg, tokens, self.source_task[task_ids])
        cfg = self.config_of(role)
        projector, w, vecs = self.parts(role)
        if projector is not None:
            pw, bos = self.projected_all(role)
            return forward(_take(pw, task_ids), cfg, tokens, bos[task_ids])
        if base == "scratch":
            return forward(_take(w, task_ids), cfg, tokens, vecs[task_ids])
        return forward(w, cfg, tokens, vecs[task_ids])

    def forward(self, tokens: torch.Tensor, task_ids: torch.Tensor, distill: float = 0.0) -> dict[str, torch.Tensor]:
        """Training losses (nats/token) of every role on one batch.

        distill > 0 adds distill * KL(source || small) to every small role alike (projected,
        universal, scratch), the source's logits detached: a teacher for all or for none.
        """
        src = self.logits("source", tokens, task_ids)
        out = {"source": nll(src, tokens)}
        teacher = src.detach().float().log_softmax(-1) if distill > 0 else None
        for r in self.roles[1:]:
            logits = self.logits(r, tokens, task_ids)
            out[r] = nll(logits, tokens)
            if teacher is not None:
                kl = F.kl_div(logits.float().log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1)
                out[r] = out[r] + distill * kl.mean()
        return out

    def role_params(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimised unit: source, every projector, every small model."""
        out = {
            "source": list(self.source.parameters()) + [self.source_task],
            "projector": list(self.projector.parameters()),
            "universal": list(self.universal.parameters()) + [self.universal_task],
            "scratch": list(self.scratch.parameters()) + [self.scratch_bos],
        }
        for name, rung in self.ladder.items():
            out[f"projector@{name}"] = list(rung.projector.parameters())
            out[f"universal@{name}"] = list(rung.universal.parameters()) + [rung.universal_task]
        return out

    def role_prefixes(self, role: str) -> tuple[str, ...]:
        """State-dict prefixes a role's deployable model depends on (projected needs source + operator)."""
        base, size = split_role(role)
        if base == "source":
            return ("source.", "source_task")
        if base == "projected":
            return ("source.", "source_task", f"ladder.{size}.projector." if size else "projector.")
        if size:
            return (f"ladder.{size}.universal.", f"ladder.{size}.universal_task")
        return ("universal.", "universal_task") if base == "universal" else ("scratch.", "scratch_bos")

    def specialise(self, role: str, task: int) -> tuple[ModelConfig, Weights, torch.Tensor]:
        """One task's deployable model of a role: (config, weights, bos vector)."""
        base, _ = split_role(role)
        with torch.no_grad():
            if base == "source":
                return self.src_cfg, dict(self.source.weights()), self.source_task[task]
            cfg = self.config_of(role)
            projector, w, vecs = self.parts(role)
            if projector is not None:
                pw, bos = projector(self.source.weights(), self.source_task[task: task + 1])
                return cfg, {k: v[0] for k, v in pw.items()}, bos[0]
            if base == "scratch":
                return cfg, {k: v[task] for k, v in w.items()}, vecs[task]
            return cfg, dict(w), vecs[task]
