"""The graph contract every layer shares: `scoring` (tokens [N, T] -> logits [N, T, V]) and one `decode` step
(token [N, 1] + past keys/values [L, N, H, P, hd] -> logits [N, V] + present [L, N, H, P+1, hd]). An ONNX Runtime
compile's decode graph holds one cache per layer instead, `past_kv_<i>` -> `present_kv_<i>` [2, N, H, P, hd]
(keys, values: what its Attention kernels read and write, so no step copies a cache outside them). Every loop
feeds each `present*` output back as its `past*` input (`cache_pairs`), so both speak the same protocol."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..devices.choices import StrEnum
from ..devices.errors import ProjectableEdgeError


class GraphKind(StrEnum):
    SCORING = "scoring"
    DECODE = "decode"

    @property
    def key(self) -> str:
        """The graph's key in a manifest `graphs` entry ({"score": ..., "decode": ...})."""
        return "score" if self is GraphKind.SCORING else "decode"

    @property
    def file_name(self) -> str:
        return f"{self.value}.onnx"

    @property
    def inputs(self) -> tuple[str, ...]:
        return ("tokens",) if self is GraphKind.SCORING else ("token", "past_keys", "past_values")

    @property
    def outputs(self) -> tuple[str, ...]:
        return ("logits",) if self is GraphKind.SCORING else ("logits", "present_keys", "present_values")


SPEC_KEY = "projectable_edge.export_spec"  # the ONNX metadata entry holding the exporter's spec of a graph
FACTS = ("vocab_size", "bos_id", "block_size", "n_layer", "n_head", "head_dim")  # what a graph's spec fixes


def check_facts(runner, facts: Mapping[str, Any], where: str) -> None:
    """The model facts a manifest gives must be those the graph itself was exported with (its spec, where the
    runner can read one): an edited manifest that no longer describes its graphs fails here, not mid-sampling."""
    spec = getattr(runner, "spec", None) or {}
    wrong = [f"{k} {facts[k]!r} (the graph says {spec[k]!r})" for k in FACTS if k in spec and facts.get(k) != spec[k]]
    if wrong:
        raise ProjectableEdgeError(f"{where} does not describe graph '{runner.name}': {', '.join(wrong)}; "
                                   "regenerate the bundle")


LAYER_CACHE = "past_kv_"  # + layer index: a compiled decode graph's per-layer cache input


def cache_pairs(input_names) -> list[tuple[str, str]]:
    """A decode graph's (past input, present output) pairs: per layer where it has per-layer caches."""
    layers = sorted((n for n in input_names if n.startswith(LAYER_CACHE) and n[len(LAYER_CACHE):].isdigit()),
                    key=lambda n: int(n[len(LAYER_CACHE):]))
    if layers:
        return [(n, "present" + n[len("past"):]) for n in layers]
    return [("past_keys", "present_keys"), ("past_values", "present_values")]


def _decode_io(input_names) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pairs = cache_pairs(input_names)
    return ("token", *(p for p, _ in pairs)), ("logits", *(q for _, q in pairs))


def kind_of(input_names) -> GraphKind:
    names = set(input_names)
    if names == {"tokens"}:
        return GraphKind.SCORING
    if names == set(_decode_io(names)[0]):
        return GraphKind.DECODE
    raise ProjectableEdgeError(f"ONNX graph inputs {sorted(names)} are neither a scoring graph ('tokens') nor "
                               "a decode graph ('token' and 'past_keys', 'past_values' or per-layer 'past_kv_<i>'); "
                               "use a graph written by `projectable-edge export`")


def check_io(runner, kind: GraphKind) -> None:
    """A graph that does not speak the contract fails when it is opened, not mid-sampling."""
    inputs, outputs = (kind.inputs, kind.outputs) if kind is GraphKind.SCORING else _decode_io(runner.input_names)
    missing = [n for n in inputs if n not in runner.input_names] + [n for n in outputs if n not in runner.output_names]
    if missing:
        raise ProjectableEdgeError(f"{kind.key} graph '{runner.name}' lacks tensor(s) {missing} (has "
                                   f"inputs {runner.input_names}, outputs {runner.output_names}); regenerate it")


@dataclass(frozen=True)
class CacheLayout:
    """What a decode loop needs to know of a model: cache shape and the BOS id that starts it."""

    n_layer: int
    n_head: int
    head_dim: int
    bos_id: int

    @classmethod
    def of(cls, meta: Mapping[str, Any] | Any) -> "CacheLayout":
        """From a manifest `model` dict or anything with these attributes (ExportSpec, a model config)."""
        get = meta.get if isinstance(meta, Mapping) else (lambda k: getattr(meta, k))
        return cls(*(int(get(k)) for k in ("n_layer", "n_head", "head_dim", "bos_id")))

    def empty(self, batch: int, dtype=np.float32, name: str = "past_keys") -> np.ndarray:
        """The first step's cache (past length 0): [L, batch, H, 0, hd], or [2, batch, H, 0, hd] per layer."""
        rows = 2 if name.startswith(LAYER_CACHE) else self.n_layer
        return np.zeros((rows, batch, self.n_head, 0, self.head_dim), dtype)

    def first_feed(self, runner, token: np.ndarray) -> dict[str, np.ndarray]:
        """The first decode step's feed for `runner`: `token` and every cache empty, in the graph's dtype."""
        dtype = getattr(runner, "input_dtypes", {})
        return {"token": token, **{p: self.empty(len(token), dtype.get(p, np.dtype(np.float32)), p)
                                   for p, _ in cache_pairs(runner.input_names)}}


def per_layer(tensors: Mapping[str, np.ndarray], which: str = "past") -> dict[str, np.ndarray]:
    """The exported contract's `<which>_keys`/`<which>_values` [L, ...] as per-layer caches `<which>_kv_<i>`."""
    keys, values = tensors[f"{which}_keys"], tensors[f"{which}_values"]
    return {f"{which}_kv_{i}": np.stack([keys[i], values[i]]) for i in range(len(keys))}


def score_logits(runner, tokens: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Scoring-graph logits [N, T, V] for tokens [N, T], `chunk` sequences per call."""
    return np.concatenate([runner.run({"tokens": tokens[i:i + chunk]})["logits"]
                           for i in range(0, len(tokens), chunk)])


def rollout(runner, layout: CacheLayout, tokens: np.ndarray,
            on_feed: Callable[[dict], None] | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Teacher-forced decode of tokens [N, T] (BOS, then tokens[:, :-1]): (logits [N, T, V], the last step's
    present caches by output name). `on_feed` sees every step's feed (calibration collects them)."""
    n, t = tokens.shape
    fed = np.empty((t, n, 1), np.int64)  # step-major, so each step's token column is contiguous
    fed[0], fed[1:, :, 0] = layout.bos_id, tokens[:, :-1].T
    feed, pairs, logits, out = layout.first_feed(runner, fed[0]), cache_pairs(runner.input_names), None, {}
    for i in range(t):
        feed["token"] = fed[i]
        if on_feed is not None:
            on_feed(dict(feed))
        out = runner.run(feed)
        if logits is None:
            logits = np.empty((n, t) + out["logits"].shape[1:], out["logits"].dtype)
        logits[:, i] = out["logits"]
        for past, present in pairs:
            feed[past] = out[present]
    return logits, {present: out[present] for _, present in pairs}


def graph_logits(runner, kind: GraphKind, layout: CacheLayout | None, tokens: np.ndarray,
                 chunk: int = 64) -> np.ndarray:
    """Logits [N, T, V] of either graph on tokens [N, T]: one pass, or a teacher-forced rollout."""
    if kind is GraphKind.SCORING:
        return score_logits(runner, tokens, chunk)
    return np.concatenate([rollout(runner, layout, tokens[i:i + chunk])[0] for i in range(0, len(tokens), chunk)])
