"""Bits per dimension from the scoring graph, in numpy: float64 from whatever the graph emits (fp32 or fp16
logits), so the metric adds no quantization error of its own to the variant being measured."""
from __future__ import annotations

import math

import numpy as np

from ..devices.errors import ProjectableEdgeError

_LN2 = math.log(2.0)


def bits_per_dim(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """logits [N, T, V], tokens int64 [N, T] -> per-image NLL in bits per token, float64 [N]."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(x, tokens[..., None], axis=-1)[..., 0]
    return (lse - picked).mean(axis=1) / _LN2


def score_tokens(runner, tokens: np.ndarray, chunk: int = 256, what: str = "graph") -> np.ndarray:
    """Run the scoring graph over validated tokens [N, T] in chunks; bits/dim float64 [N]."""
    n = len(tokens)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if n <= chunk:  # the common case: one call, no concatenation
        bits = bits_per_dim(runner.run({"tokens": tokens})["logits"], tokens)
    else:
        bits = np.concatenate([
            bits_per_dim(runner.run({"tokens": tokens[i:i + chunk]})["logits"], tokens[i:i + chunk])
            for i in range(0, n, chunk)])
    if not math.isfinite(bits.sum()):  # one reduction; any NaN/inf makes the sum non-finite
        raise ProjectableEdgeError(f"{what} produced non-finite logits for {int((~np.isfinite(bits)).sum())} "
                                   "image(s); this graph variant is numerically broken — load the bundle "
                                   "with precision='fp32' and regenerate the quantized variant")
    return bits
