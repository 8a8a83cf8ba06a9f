"""What the exporters need of a model, as a Protocol they own, so they never import projectable_edge (whose
SpecialisedModel implements it)."""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class ModelShape(Protocol):
    vocab_size: int  # token ids 0..vocab_size-1; id vocab_size is BOS
    block_size: int  # longest sequence
    n_layer: int
    n_head: int
    head_dim: int
    d_model: int


@runtime_checkable
class ExportableModel(Protocol):
    """A single-task autoregressive model over token ids, with a KV-cache decode step."""

    cfg: ModelShape

    @property
    def bos_id(self) -> int: ...

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scoring: tokens [B, T] int64 -> logits [B, T, V]; logits[:, i] predicts tokens[:, i]."""

    def decode_step(self, token: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        """token [B, 1], past [L, B, H, P, hd] x2 -> logits [B, V], present [L, B, H, P+1, hd] x2."""

    def eval(self): ...
