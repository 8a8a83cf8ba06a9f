"""The graph contract every layer shares: `scoring` (tokens [N, T] -> logits [N, T, V]) and one `decode` step
(token [N, 1] + past keys/values [L, N, H, P, hd] -> logits [N, V] + present [L, N, H, P+1, hd])."""
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


def kind_of(input_names) -> GraphKind:
    names = set(input_names)
    for kind in GraphKind:
        if names == set(kind.inputs):
            return kind
    raise ProjectableEdgeError(f"ONNX graph inputs {sorted(names)} are neither a scoring graph ('tokens') nor "
                               "a decode graph ('token', 'past_keys', 'past_values'); use a graph written by "
                               "`projectable-edge export`")


def check_io(runner, kind: GraphKind) -> None:
    """A graph that does not speak the contract fails when it is opened, not mid-sampling."""
    missing = ([n for n in kind.inputs if n not in runner.input_names]
               + [n for n in kind.outputs if n not in runner.output_names])
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

    def empty(self, batch: int, dtype=np.float32) -> np.ndarray:
        """An empty cache [L, batch, H, 0, hd]: past length 0, the first decode step."""
        return np.zeros((self.n_layer, batch, self.n_head, 0, self.head_dim), dtype)


def cache_dtype(runner) -> np.dtype:
    return getattr(runner, "input_dtypes", {}).get("past_keys", np.dtype(np.float32))


def score_logits(runner, tokens: np.ndarray, chunk: int = 64) -> np.ndarray:
    """Scoring-graph logits [N, T, V] for tokens [N, T], `chunk` sequences per call."""
    return np.concatenate([runner.run({"tokens": tokens[i:i + chunk]})["logits"]
                           for i in range(0, len(tokens), chunk)])


def rollout(runner, layout: CacheLayout, tokens: np.ndarray,
            on_feed: Callable[[dict], None] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced decode of tokens [N, T] (BOS, then tokens[:, :-1]): (logits [N, T, V], last present keys,
    last present values). `on_feed` sees every step's feed (calibration collects them)."""
    n, t = tokens.shape
    dtype = cache_dtype(runner)
    fed = np.empty((t, n, 1), np.int64)  # step-major, so each step's token column is contiguous
    fed[0], fed[1:, :, 0] = layout.bos_id, tokens[:, :-1].T
    keys, values, logits = layout.empty(n, dtype), layout.empty(n, dtype), None
    for i in range(t):
        feed = {"token": fed[i], "past_keys": keys, "past_values": values}
        if on_feed is not None:
            on_feed(feed)
        out = runner.run(feed)
        if logits is None:
            logits = np.empty((n, t) + out["logits"].shape[1:], out["logits"].dtype)
        logits[:, i] = out["logits"]
        keys, values = out["present_keys"], out["present_values"]
    return logits, keys, values


def graph_logits(runner, kind: GraphKind, layout: CacheLayout | None, tokens: np.ndarray,
                 chunk: int = 64) -> np.ndarray:
    """Logits [N, T, V] of either graph on tokens [N, T]: one pass, or a teacher-forced rollout."""
    if kind is GraphKind.SCORING:
        return score_logits(runner, tokens, chunk)
    return np.concatenate([rollout(runner, layout, tokens[i:i + chunk])[0] for i in range(0, len(tokens), chunk)])
