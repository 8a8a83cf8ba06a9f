"""Training configuration: frozen dataclasses and the named presets.

The whole TrainConfig is saved as JSON next to every run so any result can be reproduced.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.data import check_seed
from projectable_edge.model import ModelConfig
from projectable_edge.projection import ProjectionConfig, check_fits
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec


@dataclass(frozen=True)
class Widths:
    """Model shape without the data-dependent vocabulary and block size."""

    n_layer: int
    n_head: int
    d_model: int
    d_attn: int
    d_mlp: int

    def model(self, spec: TokenizerSpec) -> ModelConfig:
        return ModelConfig(vocab_size=spec.vocab_size, block_size=spec.seq_len, n_layer=self.n_layer,
                           n_head=self.n_head, d_model=self.d_model, d_attn=self.d_attn, d_mlp=self.d_mlp)

    @property
    def name(self) -> str:
        return f"{self.d_model}x{self.n_layer}"


_SHAPE_ONLY = TokenizerSpec(2, 2, 1, 2)  # any spec: size checks compare widths and depths only


def parse_size(text: str, like: Widths) -> Widths:
    """A small size "WIDTH[xLAYERS]" shaped like `like`: attention width W, MLP 4W, heads of 8.

    Layers default to those of `like` (the preset's main small size).
    """
    m = re.fullmatch(r"\s*(\d+)\s*(?:x\s*(\d+))?\s*", str(text))
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ProjectableEdgeError(f"bad small size {text!r}: write WIDTH or WIDTHxLAYERS, e.g. 16 or 32x2")
    width, layers = int(m.group(1)), int(m.group(2) or like.n_layer)
    n_head = max(1, min(like.n_head, width // 8))
    if width % n_head:
        raise ProjectableEdgeError(f"bad small size {text!r}: width {width} must split into {n_head} heads")
    return Widths(layers, n_head, width, width, 4 * width)


EXTRA_OPERATOR = ("all", "mixtures", "none")
MAX_BATCH = 1 << 16  # sequences per step: beyond it one step's activations outgrow any host this trains on


@dataclass(frozen=True)
class TrainConfig:
    preset: str
    source: Widths
    small: Widths
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3  # source and every baseline
    projector_lr: float = 1e-3  # the operator trains 3x slower than the models (see README: what was tried)
    lam: float = 1.0  # weight of NLL(projected) in the joint loss
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 50
    shift: int = 1  # random +-shift pixels applied to every model's training batches
    n_basis: int = 8  # K basis maps per space (K = 4 lost seed 1 of MNIST: README, what was tried)
    coef_init: float = 1.0  # std of the operator's mixture logits at init (see ProjectionConfig)
    mixture: str = "per_space"  # one softmax over the K bases per space (see ProjectionConfig)
    distill: float = 0.0  # weight of KL(source || small) for every small role alike (0: off)
    ladder: tuple[str, ...] = ()  # extra small sizes "WIDTH[xLAYERS]", each with its universal baseline
    freeze_source: bool = False
    # the second stage: this many extra steps for every small model on the frozen trained source
    # (projected: its operator; universal and scratch: continued; universal@ws[+kd]: from the slice)
    extra_steps: int = 0
    # How the projected model trains in the second stage. The defaults are the design chosen on the
    # validation splits of digits and MNIST (README: what was tried): a shared learned delta, the
    # operator and delta at a tenth of the first stage's rates (a fine-tune), distillation from M.
    delta: bool = True  # projected = shared learned small weights + the task's projection (ProjectionConfig)
    projected_lr_scale: float = 0.1  # its learning rates, as a multiple of the first stage's
    projected_kd: float = 1.0  # weight of KL(source || projected)
    # which operator weights learn (the delta always does): "all" (the basis maps and the mixture layer),
    # "mixtures" (the mixture layer only) or "none" (the projections stay as the joint stage left them)
    extra_operator: str = "all"
    kd: float = 1.0  # weight of KL(source || small) for universal@ws+kd
    sliced_lr_scale: float = 1.0  # universal@ws[+kd]'s learning rate as a multiple of `lr` (1 won on validation)
    eval_every: int = 100  # validation + best-checkpoint selection (same rule for every model)
    checkpoint_every: int = 200  # resumable state written atomically this often
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "n_basis"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProjectableEdgeError(f"training option '{name}' must be a whole number >= 1, got {v!r}")
        if self.batch_size > MAX_BATCH:
            raise ProjectableEdgeError(f"training option 'batch_size' must be at most {MAX_BATCH}, got "
                                       f"{self.batch_size}; use a smaller batch (more steps)")
        for name in ("lr", "projector_lr", "grad_clip", "projected_lr_scale", "sliced_lr_scale"):
            if not 0 < getattr(self, name) < math.inf:
                raise ProjectableEdgeError(f"training option '{name}' must be a finite number > 0, "
                                           f"got {getattr(self, name)!r}")
        for name in ("lam", "weight_decay", "shift", "warmup_steps", "distill", "extra_steps", "kd", "projected_kd"):
            v = getattr(self, name)
            if isinstance(v, bool) or not 0 <= v < math.inf:  # an infinite loss weight trains to NaN
                raise ProjectableEdgeError(f"training option '{name}' must be a finite number >= 0, got {v!r}")
        if self.extra_operator not in EXTRA_OPERATOR:
            raise ProjectableEdgeError(f"training option 'extra_operator' must be one of {EXTRA_OPERATOR}, "
                                       f"got {self.extra_operator!r}")
        if not isinstance(self.extra_steps, int):
            raise ProjectableEdgeError(f"training option 'extra_steps' must be a whole number, got {self.extra_steps!r}")
        check_seed("training option 'seed'", self.seed)
        self.projection.to_dict()  # validates the operator options
        ladder = self.ladder.split(",") if isinstance(self.ladder, str) else self.ladder  # "16,64" too
        object.__setattr__(self, "ladder", tuple(str(x).strip() for x in ladder if str(x).strip()))
        for w in (self.small, *self.rungs().values()):  # every small size must fit in the source
            check_fits(self.source.model(_SHAPE_ONLY), w.model(_SHAPE_ONLY))
        if self.small.name in self.rungs():
            raise ProjectableEdgeError(f"ladder size {self.small.name} is the main small size; leave it out")

    @property
    def projection(self) -> ProjectionConfig:
        return ProjectionConfig(n_basis=self.n_basis, coef_init=self.coef_init, mixture=self.mixture,
                                delta=self.delta and self.extra_steps > 0)  # the delta learns in the second stage only

    def rungs(self) -> dict[str, Widths]:
        """The ladder's extra small sizes by name ("16x4")."""
        sizes = [parse_size(s, self.small) for s in self.ladder]
        return {w.name: w for w in sizes}

    def to_dict(self) -> dict:
        return {**asdict(self), "ladder": list(self.ladder)}  # JSON-shaped, so a saved config compares equal

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        try:
            kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
            kw["source"] = Widths(**d["source"])
            kw["small"] = Widths(**d["small"])
            kw["ladder"] = tuple(d.get("ladder", ()))
            kw.setdefault("mixture", "shared")  # runs saved before per-space mixtures existed
            return cls(**kw)
        except (KeyError, TypeError, AttributeError) as e:  # a hand-edited run config
            raise ProjectableEdgeError(f"the run's 'train' config is malformed ({type(e).__name__}: {e}); "
                                       "copy the run folder again") from None


PRESETS: dict[str, TrainConfig] = {
    # seconds: for tests
    "tiny": TrainConfig(preset="tiny", source=Widths(2, 2, 32, 32, 64), small=Widths(2, 2, 16, 16, 32),
                        steps=60, batch_size=32, eval_every=20, checkpoint_every=20, warmup_steps=10),
    # a few minutes on 2 CPU cores: the demo default
    "small": TrainConfig(preset="small", source=Widths(4, 4, 128, 128, 512), small=Widths(4, 4, 32, 32, 128),
                         steps=700, batch_size=32),
    # the small sizes at the budget of the README's claim table: 2,800 joint steps (where the source stops
    # improving on digits), then 2,800 extra steps for every small model; about 20 minutes on 2 CPU cores
    "small-long": TrainConfig(preset="small-long", source=Widths(4, 4, 128, 128, 512),
                              small=Widths(4, 4, 32, 32, 128), steps=2800, extra_steps=2800, batch_size=32),
    # meant for a GPU
    "base": TrainConfig(preset="base", source=Widths(8, 8, 512, 512, 2048), small=Widths(4, 4, 64, 64, 256),
                        steps=20000, batch_size=256, lr=1e-3, projector_lr=3e-4, eval_every=500,
                        checkpoint_every=1000, warmup_steps=500),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ProjectableEdgeError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    ladder = overrides.get("ladder")  # given but empty (",,,") or with a gap ("16,,64"): refused, not skipped
    sizes = [str(s).strip() for s in (ladder.split(",") if isinstance(ladder, str) else ladder or ())]
    if ladder is not None and not any(sizes):
        raise ProjectableEdgeError("the ladder (--ladder) names no size: give sizes like 16,64, or leave it out")
    if not all(sizes):
        shown = ladder if isinstance(ladder, str) else ",".join(sizes)
        raise ProjectableEdgeError(f"the ladder (--ladder) has an empty size in '{shown}': give sizes like 16,64")
    base = PRESETS[name]
    if isinstance(overrides.get("small"), str):
        overrides["small"] = parse_size(overrides["small"], base.small)
    return replace(base, **overrides)

