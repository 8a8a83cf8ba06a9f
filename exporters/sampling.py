"""A minimal numpy sampler over the exported graphs, to prove the KV-cache decode graph samples
exactly what full recomputation through the scoring graph samples (same seed, same tokens).

Both paths draw the same uniform numbers in the same order and pick each token with the
runtime's `runtime.sampler.choose` (one float64 inverse-CDF rule for exporters and runtime),
so they can only disagree if the graphs' logits disagree.
"""

from __future__ import annotations

import json

import numpy as np

from devices.errors import ProjectableEdgeError
from exporters.onnx_io import make_session
from exporters.spec import META_KEY, ExportSpec
from runtime.sampler import choose


def session_spec(session) -> ExportSpec:
    meta = session.get_modelmeta().custom_metadata_map
    if META_KEY not in meta:
        raise ProjectableEdgeError("this ONNX graph carries no projectable-edge export spec; use a graph written "
                                   "by `projectable-edge export`")
    return ExportSpec.from_dict(json.loads(meta[META_KEY]))


def _open(session_or_path):
    return make_session(session_or_path) if not hasattr(session_or_path, "run") else session_or_path


def pick(logits: np.ndarray, rng: np.random.Generator | None, temperature: float = 1.0,
         greedy: bool = False) -> np.ndarray:
    """Next token per row of logits [B, V]: argmax, or inverse-CDF sampling of softmax(logits / T).

    The runtime's `choose` with no top-k; greedy is its temperature 0 (and draws nothing from rng).
    """
    if greedy:
        return choose(logits, rng, 0, None)
    if temperature <= 0:
        raise ProjectableEdgeError(f"temperature must be > 0 (or use greedy), got {temperature}")
    return choose(logits, rng, temperature, None)


def sample_decode(decode, n: int, *, seed: int = 0, temperature: float = 1.0, greedy: bool = False,
                  length: int | None = None) -> np.ndarray:
    """n sequences [n, length] through the decode graph, one token per step with the KV cache."""
    sess = _open(decode)
    spec = session_spec(sess)
    length = length or spec.block_size
    rng = np.random.default_rng(seed)
    pk = np.zeros((spec.n_layer, n, spec.n_head, 0, spec.head_dim), np.float32)
    pv = pk.copy()
    tok = np.full((n, 1), spec.bos_id, np.int64)
    out = np.zeros((n, length), np.int64)
    for i in range(length):
        logits, pk, pv = sess.run(None, {"token": tok, "past_keys": pk, "past_values": pv})
        out[:, i] = pick(logits, rng, temperature, greedy)
        tok = out[:, i:i + 1]
    return out


def sample_recompute(scoring, n: int, *, seed: int = 0, temperature: float = 1.0, greedy: bool = False,
                     length: int | None = None) -> np.ndarray:
    """The same sampler through the scoring graph, recomputing the whole prefix every step."""
    sess = _open(scoring)
    spec = session_spec(sess)
    length = length or spec.block_size
    rng = np.random.default_rng(seed)
    out = np.zeros((n, length), np.int64)
    for i in range(length):
        # logits[:, i] depends on tokens[:, :i] only; position i's own value is a placeholder
        logits = sess.run(["logits"], {"tokens": out[:, : i + 1]})[0][:, i]
        out[:, i] = pick(logits, rng, temperature, greedy)
    return out
