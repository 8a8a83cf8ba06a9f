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
# universal models initialised from the trained source by weight selection (the operator's step-0
# slice, task vectors sliced too) and trained in the run's second stage, without / with distillation
SLICED = ("universal@ws", "universal@ws+kd")


def role_generator(seed: int, role: str) -> torch.Generator:
    """A generator that depends on (seed, role) only."""
    digest = hashlib.sha256(f"{seed}/{role}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def split_role(role: str) -> tuple[str, str | None]:
    """'projected@16x4' -> ('projected', '16x4'); 'universal' -> ('universal', None).

    The sliced universal models ('universal@ws', 'universal@ws+kd') are the main size: (base, None).
    """
    if role in SLICED:
        return "universal", None
    base, _, size = role.partition("@")
    if base not in ROLES or (size and base not in LADDER_ROLES):
        raise ProjectableEdgeError(f"unknown model role {role!r}: use one of {', '.join(ROLES + SLICED)}, "
                                   f"or {'/'.join(LADDER_ROLES)}@<size> for a ladder size")
    return base, size or None


def _sliced_key(role: str) -> str:
    return role.split("@")[1].replace("+", "_")  # module names cannot hold '+'


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


class SmallModel(nn.Module):
    """One small model shared by every task, with a task (BOS) vector per task."""

    def __init__(self, cfg: ModelConfig, n_task: int, g: torch.Generator):
        super().__init__()
        self.weights = WeightSet(init_weights(cfg, g))
        self.task = nn.Parameter(torch.randn(n_task, cfg.d_model, generator=g) * 0.02)


class Rung(nn.Module):
    """One extra small size of the ladder: its projector and its equal-size universal model."""

    def __init__(self, src: ModelConfig, small: ModelConfig, n_task: int, pcfg: ProjectionConfig,
                 seed: int, name: str, baselines: bool = True):
        super().__init__()
        self.cfg = small
        self.projector = Projector(src, small, pcfg, role_generator(seed, f"projected@{name}"))
        if baselines:
            g = role_generator(seed, f"universal@{name}")
            self.universal = WeightSet(init_weights(small, g))
            self.universal_task = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)


class Trainables(nn.Module):
    """baselines=False builds only the source and the operators: what projecting a task needs."""

    def __init__(self, src: ModelConfig, small: ModelConfig, n_task: int, pcfg: ProjectionConfig, seed: int = 0,
                 ladder: dict[str, ModelConfig] | None = None, baselines: bool = True, sliced: bool = False):
        super().__init__()
        self.src_cfg, self.small_cfg, self.n_task, self.baselines = src, small, n_task, baselines
        g = role_generator(seed, "source")
        self.source = WeightSet(init_weights(src, g))
        self.source_task = nn.Parameter(torch.randn(n_task, src.d_model, generator=g) * 0.02)
        self.projector = Projector(src, small, pcfg, role_generator(seed, "projected"))
        if baselines:
            g = role_generator(seed, "universal")
            self.universal = WeightSet(init_weights(small, g))
            self.universal_task = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)
            g = role_generator(seed, "scratch")
            self.scratch = WeightSet(_stack_inits(small, n_task, g))
            self.scratch_bos = nn.Parameter(torch.randn(n_task, small.d_model, generator=g) * 0.02)
        self.ladder = nn.ModuleDict({name: Rung(src, cfg, n_task, pcfg, seed, name, baselines)
                                     for name, cfg in (ladder or {}).items()})
        # placeholders until init_sliced() copies the trained source's slice in (second stage)
        self.sliced = nn.ModuleDict({_sliced_key(r): SmallModel(small, n_task, role_generator(seed, r))
                                     for r in (SLICED if sliced and baselines else ())})

    @property
    def roles(self) -> tuple[str, ...]:
        kept = ROLES if self.baselines else ("source", "projected")
        rung = LADDER_ROLES if self.baselines else ("projected",)
        sliced = tuple(r for r in SLICED if _sliced_key(r) in self.sliced)
        return kept + sliced + tuple(f"{r}@{n}" for n in self.ladder for r in rung)

    @torch.no_grad()
    def init_sliced(self) -> None:
        """Start every sliced universal model at the source's weight-selection slice: the projection
        of the current source through selection maps (the operator at step 0), task vectors included."""
        select = Projector(self.src_cfg, self.small_cfg, ProjectionConfig(n_basis=1), torch.Generator())
        w, bos = select(self.source.weights(), self.source_task)  # identical for every task
        for m in self.sliced.values():
            for k, p in m.weights.weights().items():
                p.copy_(w[k][0])
            m.task.copy_(bos)

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
        if base in ("universal", "scratch") and not self.baselines:
            raise ProjectableEdgeError(f"role {role!r} was not loaded (this model holds the source and operators only)")
        if role in SLICED:
            if _sliced_key(role) not in self.sliced:
                raise ProjectableEdgeError(f"this run has no {role!r} model: it is trained by the second stage "
                                           "(train with --extra-steps)")
            m = self.sliced[_sliced_key(role)]
            return None, m.weights.weights(), m.task
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

    def forward(self, tokens: torch.Tensor, task_ids: torch.Tensor, roles: tuple[str, ...] | None = None,
                distill: float = 0.0, kd: dict[str, float] | None = None) -> dict[str, torch.Tensor]:
        """Training losses (nats/token) of `roles` (default: all but the sliced models) on one batch.

        distill > 0 adds distill * KL(source || small) to every small role alike, the source's logits
        detached: a teacher for all or for none. kd {role: w} adds w * the same term to those roles only.
        """
        def weight(r: str) -> float:
            return distill + (kd or {}).get(r, 0.0)

        roles = roles or tuple(r for r in self.roles if r not in SLICED)
        out, teacher = {}, None
        if "source" in roles:
            src = self.logits("source", tokens, task_ids)
            out["source"] = nll(src, tokens)
        if any(weight(r) > 0 for r in roles if r != "source"):
            if "source" not in roles:
                with torch.no_grad():
                    src = self.logits("source", tokens, task_ids)
            teacher = src.detach().float().log_softmax(-1)
        for r in roles:
            if r == "source":
                continue
            logits = self.logits(r, tokens, task_ids)
            out[r] = nll(logits, tokens)
            if teacher is not None and weight(r) > 0:
                kl = F.kl_div(logits.float().log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1)
                out[r] = out[r] + weight(r) * kl.mean()
        return out

    def role_params(self) -> dict[str, list[nn.Parameter]]:
        """Parameters per optimised unit: source, every projector, every small model."""
        out = {"source": list(self.source.parameters()) + [self.source_task],
               "projector": list(self.projector.parameters())}
        if self.baselines:
            out["universal"] = list(self.universal.parameters()) + [self.universal_task]
            out["scratch"] = list(self.scratch.parameters()) + [self.scratch_bos]
        for name, rung in self.ladder.items():
            out[f"projector@{name}"] = list(rung.projector.parameters())
            if self.baselines:
                out[f"universal@{name}"] = list(rung.universal.parameters()) + [rung.universal_task]
        for r in SLICED:
            if _sliced_key(r) in self.sliced:
                out[r] = list(self.sliced[_sliced_key(r)].parameters())
        return out

    def role_prefixes(self, role: str) -> tuple[str, ...]:
        """State-dict prefixes a role's deployable model depends on (projected needs source + operator)."""
        base, size = split_role(role)
        if role in SLICED:
            return (f"sliced.{_sliced_key(role)}.",)
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
