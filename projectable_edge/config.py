"""Training configuration: frozen dataclasses and the named presets.

The whole TrainConfig is saved as JSON next to every run so any result can be reproduced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from devices.errors import ProjectableEdgeError
from projectable_edge.model import ModelConfig
from runtime.tokenizer import TokenizerSpec


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
    n_basis: int = 4
    coef_init: float = 1.0  # std of the operator's mixture logits at init (see ProjectionConfig)
    freeze_source: bool = False
    eval_every: int = 100  # validation + best-checkpoint selection (same rule for every model)
    checkpoint_every: int = 200  # resumable state written atomically this often
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "n_basis"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProjectableEdgeError(f"training option '{name}' must be a whole number >= 1, got {v!r}")
        for name in ("lr", "projector_lr", "grad_clip"):
            if not getattr(self, name) > 0:
                raise ProjectableEdgeError(f"training option '{name}' must be > 0, got {getattr(self, name)!r}")
        if self.lam < 0 or self.weight_decay < 0 or self.shift < 0 or self.warmup_steps < 0:
            raise ProjectableEdgeError("training options 'lam', 'weight_decay', 'shift' and 'warmup_steps' "
                                       "must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["source"] = Widths(**d["source"])
        kw["small"] = Widths(**d["small"])
        return cls(**kw)


PRESETS: dict[str, TrainConfig] = {
    # seconds: for tests
    "tiny": TrainConfig(preset="tiny", source=Widths(2, 2, 32, 32, 64), small=Widths(2, 2, 16, 16, 32),
                        steps=60, batch_size=32, eval_every=20, checkpoint_every=20, warmup_steps=10),
    # a few minutes on 2 CPU cores: the demo default
    "small": TrainConfig(preset="small", source=Widths(4, 4, 128, 128, 512), small=Widths(4, 4, 32, 32, 128),
                         steps=700, batch_size=32),
    # meant for a GPU
    "base": TrainConfig(preset="base", source=Widths(8, 8, 512, 512, 2048), small=Widths(4, 4, 64, 64, 256),
                        steps=20000, batch_size=256, lr=1e-3, projector_lr=3e-4, eval_every=500,
                        checkpoint_every=1000, warmup_steps=500),
}


def preset(name: str, **overrides) -> TrainConfig:
    if name not in PRESETS:
        raise ProjectableEdgeError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **overrides)

