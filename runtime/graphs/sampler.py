"""The project's one autoregressive sampler, in numpy: `sample_kv` (decode graph, KV cache) or `sample_recompute`
(scoring graph re-run each step, for bundles without a decode graph). Both draw from one numpy Generator in the
same order, so a seed gives the same images on every backend that computes the same logits."""
from __future__ import annotations

import math

import numpy as np

from ..devices.errors import ProjectableEdgeError
from .contract import CacheLayout, GraphKind, cache_pairs, kind_of


MAX_SAMPLES = 65536  # per call: bounded memory ([n, T] tokens and uniforms, an [L, n, H, T, hd] cache)
MAX_SEED = 2**63 - 1
MIN_TEMPERATURE = 1e-6  # logits / 1e-300 overflow float64; below 1e-6 sampling is greedy in all but name


def _is_int(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def check_args(n: int, temperature: float, top_k: int | None, vocab: int, seed=0) -> None:
    if not _is_int(n) or not 1 <= n <= MAX_SAMPLES:
        raise ProjectableEdgeError(f"number of samples must be an integer in 1..{MAX_SAMPLES}, got {n!r}; "
                                   "sample more in several calls with different seeds")
    if not _is_int(seed) or not 0 <= seed <= MAX_SEED:
        raise ProjectableEdgeError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    if (not isinstance(temperature, (int, float, np.integer, np.floating)) or not math.isfinite(temperature)
            or not (temperature == 0 or temperature >= MIN_TEMPERATURE)):
        raise ProjectableEdgeError(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}, got "
                                   f"{temperature!r}")
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= vocab):
        raise ProjectableEdgeError(f"top_k must be None or an integer in 1..{vocab}, got {top_k!r}")


def uniforms(seed: int, n: int, steps: int, temperature: float) -> np.ndarray | None:
    """Every draw of a sampling call up front, [steps, n] float64: the same numbers, in the same order,
    as one rng.random(n) per sampled step (none at temperature 0)."""
    return None if temperature == 0 else np.random.default_rng(seed).random((max(steps, 0), n))


# the ufuncs themselves: ndarray.max / cumsum go through a Python layer that costs more than the work here
_max, _cumsum = np.maximum.reduce, np.add.accumulate


def choose(logits: np.ndarray, u: np.ndarray | None, temperature: float, top_k: int | None) -> np.ndarray:
    """Next token ids [n] from logits [n, V]: greedy at temperature 0, else (top-k) sampling that inverts
    the float64 CDF at the uniforms u [n]: the first id whose CDF exceeds u * total (the last id if none)."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    z = logits.astype(np.float64)
    if temperature != 1:
        z /= temperature
    if len(z) == 1 and (top_k is None or top_k >= z.shape[-1]):  # one row: the same float64 operations, fewer calls
        z = z[0]
        np.subtract(z, z[z.argmax()], out=z)  # the max (NaN if any), in one call fewer than a reduction
        np.exp(z, out=z)
        _cumsum(z, out=z)
        # searchsorted (right): the CDF's first entry above u * total; a NaN CDF (NaN sorts last) gives the last id
        return np.array([min(int(z.searchsorted(u[0] * z[-1], "right")), len(z) - 1)])
    if top_k is not None and top_k < z.shape[-1]:
        z[z < np.partition(z, -top_k, axis=-1)[:, -top_k, None]] = -np.inf
    np.subtract(z, _max(z, axis=-1, keepdims=True), out=z)
    np.exp(z, out=z)
    _cumsum(z, axis=-1, out=z)  # the CDF, in place
    above = z > np.multiply(u, z[:, -1])[:, None]
    above[:, -1] = True
    return above.argmax(axis=-1)


def _start(prefix: np.ndarray | None, n: int, length: int, temperature: float, seed: int):
    """(the prefix [n, known], known, the uniforms of the steps after it): what both samplers start from."""
    fixed = np.zeros((n, 0), np.int64) if prefix is None else prefix
    return fixed, fixed.shape[1], uniforms(seed, n, length - fixed.shape[1], temperature)


def _spans(n: int, max_batch: int | None) -> list[tuple[int, int]]:
    step = n if not max_batch else max(1, int(max_batch))
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def sample_kv(runner, layout: CacheLayout, n: int, length: int, prefix: np.ndarray | None = None,
              temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
              max_batch: int | None = None) -> np.ndarray:
    """Tokens [n, length], the first prefix.shape[1] columns copied from `prefix`. Chunks of at most max_batch rows
    (a TensorRT engine's limit) run one after another, each row drawing its own uniforms: the chunking changes no
    token, and memory holds one chunk's cache whatever n."""
    fixed, known, u = _start(prefix, n, length, temperature, seed)
    pairs, run = cache_pairs(runner.input_names), runner.run
    out = np.empty((length, n, 1), np.int64)  # step-major: out[i, a:b] is contiguous and feeds step i + 1
    out[:known, :, 0] = fixed.T
    for a, b in _spans(n, max_batch):
        feed = layout.first_feed(runner, np.full((b - a, 1), layout.bos_id, np.int64))
        for i in range(length):
            r = run(feed)
            for past, present in pairs:
                feed[past] = r[present]
            if i >= known:
                out[i, a:b, 0] = choose(r["logits"], None if u is None else u[i - known, a:b], temperature, top_k)
            feed["token"] = out[i, a:b]
    return np.ascontiguousarray(out[:, :, 0].T)


def sample_recompute(runner, n: int, length: int, prefix: np.ndarray | None = None,
                     temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
                     max_batch: int | None = None) -> np.ndarray:
    """Same contract as sample_kv, via the scoring graph on the prefix so far (logits[:, i] depends on
    tokens[:, :i] only, so position i's own value is a placeholder)."""
    fixed, known, u = _start(prefix, n, length, temperature, seed)
    out = np.zeros((n, length), np.int64)
    out[:, :known] = fixed
    for i in range(known, length):
        logits = np.concatenate([runner.run({"tokens": np.ascontiguousarray(out[a:b, :i + 1])})["logits"][:, i]
                                 for a, b in _spans(n, max_batch)])
        out[:, i] = choose(logits, None if u is None else u[i - known], temperature, top_k)
    return out


def sample(runner, layout: CacheLayout | None, n: int, length: int, prefix: np.ndarray | None = None,
           temperature: float = 1.0, top_k: int | None = None, seed: int = 0,
           max_batch: int | None = None) -> np.ndarray:
    """Sample through whichever graph `runner` holds: KV-cache decode, else scoring recompute."""
    if kind_of(runner.input_names) is GraphKind.DECODE:
        return sample_kv(runner, layout, n, length, prefix, temperature, top_k, seed, max_batch)
    return sample_recompute(runner, n, length, prefix, temperature, top_k, seed, max_batch)
