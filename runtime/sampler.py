"""Autoregressive sampling in numpy.

`sample_kv` drives the single-step decode graph with a KV cache (one step per token);
`sample_recompute` re-runs the full scoring graph each step (O(T^2)) and is the fallback
for bundles without a decode graph. Both draw from one numpy Generator in the same order,
so a seed gives the same images on every backend that computes the same logits.
"""
from __future__ import annotations

import math

import numpy as np

from devices.errors import ProjectableEdgeError


def check_args(n: int, temperature: float, top_k: int | None, vocab: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ProjectableEdgeError(f"number of samples must be an integer >= 1, got {n!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ProjectableEdgeError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or not 1 <= top_k <= vocab):
        raise ProjectableEdgeError(f"top_k must be None or an integer in 1..{vocab}, got {top_k!r}")


def choose(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_k: int | None) -> np.ndarray:
    """Next token ids [n] from logits [n, V]: greedy at temperature 0, else (top-k) sampling."""
    z = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        return z.argmax(axis=-1).astype(np.int64)
    z = z / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), z.shape[-1] - 1).astype(np.int64)


def _prefix(prefix: np.ndarray | None, n: int) -> np.ndarray:
    return np.zeros((n, 0), np.int64) if prefix is None else prefix


def sample_kv(runner, meta: dict, n: int, length: int, prefix: np.ndarray | None = None,
              temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Tokens [n, length]; the first prefix.shape[1] columns are copied from `prefix`."""
    rng = np.random.default_rng(seed)
    fixed = _prefix(prefix, n)
    dt = runner.input_dtypes.get("past_keys", np.dtype(np.float32))
    shape = (meta["n_layer"], n, meta["n_head"], 0, meta["head_dim"])
    feeds = {"token": np.full((n, 1), meta["bos_id"], np.int64),
             "past_keys": np.zeros(shape, dt), "past_values": np.zeros(shape, dt)}
    out = np.empty((n, length), np.int64)
    for i in range(length):
        res = runner.run(feeds)
        nxt = fixed[:, i] if i < fixed.shape[1] else choose(res["logits"], rng, temperature, top_k)
        out[:, i] = nxt
        feeds = {"token": np.ascontiguousarray(out[:, i:i + 1]),
                 "past_keys": res["present_keys"], "past_values": res["present_values"]}
    return out


def sample_recompute(runner, n: int, length: int, prefix: np.ndarray | None = None,
                     temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Same contract as sample_kv, via the full-sequence scoring graph (causal: later zeros are ignored)."""
    rng = np.random.default_rng(seed)
    fixed = _prefix(prefix, n)
    out = np.zeros((n, length), np.int64)
    out[:, :fixed.shape[1]] = fixed
    for i in range(fixed.shape[1], length):
        logits = runner.run({"tokens": out})["logits"][:, i]
        out[:, i] = choose(logits, rng, temperature, top_k)
    return out
