"""Load a bundle into a `Model`: the object an app embeds to score and sample on the device.

`load` refuses anything it cannot trust (bad manifest, newer schema, a file whose hash
differs) before a single graph is opened, then picks the graph variant and backend.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .devices import variants
from .devices.errors import ProjectableEdgeError
from .devices.profiles import DeviceProfile
from . import sampler
from .backends import Backend, make_runners
from .graphs import CacheLayout
from .manifest import read_manifest, verify_files
from . import candidates as cands
from .requirements import check_requirements
from .scoring import score_tokens
from .tokenizer import TokenizerSpec, validate_tokens


def pick_variant(manifest: dict[str, Any], precision: str | None) -> str:
    """Exact variant name, else what the variant registry says the word means ('int8' -> 'int8-static')."""
    graphs = manifest["graphs"]
    if precision is None:
        return manifest["selected"]
    found = variants.resolve(precision, graphs)
    if found is not None:
        return found
    raise ProjectableEdgeError(f"precision {precision!r} is not in this bundle; available variants: "
                               f"{', '.join(sorted(graphs))} (selected for the target: {manifest['selected']})")


class Model:
    """A verified bundle with its runners. Use `runtime.load()` to get one."""

    def __init__(self, bundle_dir: Path, manifest: dict[str, Any], variant: str, profile: DeviceProfile,
                 tokenizer: TokenizerSpec, score_runner, decode_runner, backend: dict[str, Any],
                 load_time_s: float, candidate: str | None = None, tuned: dict[str, Any] | None = None):
        self.bundle_dir = bundle_dir
        self.candidate = candidate  # "SIZE/VARIANT" when a candidate was opened (by name or by a tuned record)
        self.tuned = tuned or {}  # what load() did with the tuned record next to the bundle
        self.manifest = manifest
        self.variant = variant
        self.profile = profile
        self.tokenizer = tokenizer
        self.score_runner = score_runner
        self.decode_runner = decode_runner
        self.backend = backend
        self.load_time_s = load_time_s
        self.meta = dict(manifest["model"])
        self.layout = CacheLayout.of(self.meta)
        self._what = f"variant '{variant}'"
        trt = profile.tensorrt
        # a TensorRT engine has a fixed max batch (the profile's, which built it): scoring and
        # sampling split larger batches; ORT just needs bounded memory
        on_trt = backend["backend"] == Backend.TENSORRT
        self.max_batch = int(trt.max_shapes.get("batch", 256)) if trt and on_trt else 256

    @property
    def seq_len(self) -> int:
        return self.tokenizer.seq_len

    @property
    def task(self) -> dict[str, Any]:
        return self.manifest["task"]

    def info(self) -> dict[str, Any]:
        return {"bundle": str(self.bundle_dir), "task": self.task, "target": self.profile.name,
                "variant": self.variant, "selected": self.manifest["selected"],
                "variants": sorted(self.manifest["graphs"]), "candidate": self.candidate,
                "candidates": list(cands.table(self.manifest)), "tuned": self.tuned,
                "tokenizer": self.tokenizer.to_dict(), "model": self.meta, "backend": self.backend,
                "load_time_ms": self.load_time_s * 1e3}

    # -- inputs -------------------------------------------------------------------------------

    def to_tokens(self, x) -> np.ndarray:
        """uint8 arrays (or anything with >= 3 dims) are images; 1-D/2-D integer arrays are tokens."""
        a = np.asarray(x)
        if (a.dtype == np.int64 and a.ndim == 2 and a.shape[1] == self.seq_len and a.size
                and a.view(np.uint64).max() < self.tokenizer.vocab_size):
            return a  # fast path for the hot loop: one reduction (negatives wrap to huge)
        if a.dtype == np.uint8 or a.ndim >= 3:
            return self.tokenizer.encode(a)
        t = self.tokenizer.check_tokens(a)
        return t[None] if t.ndim == 1 else t

    def decode_images(self, tokens) -> np.ndarray:
        return self.tokenizer.decode(tokens)

    # -- scoring ------------------------------------------------------------------------------

    def score(self, x) -> np.ndarray:
        """Bits per dimension per image, float64 [N], for tokens [N, T] or uint8 images."""
        t = self.to_tokens(x)
        if not t.flags.c_contiguous:
            t = np.ascontiguousarray(t)
        return score_tokens(self.score_runner, t, self.max_batch, what=self._what)

    # -- sampling -----------------------------------------------------------------------------

    def sample(self, n: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
        """n new images as tokens [n, T]; deterministic for a seed."""
        return self._generate(n, None, temperature, top_k, seed)

    def complete(self, prefix_tokens, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0) -> np.ndarray:
        """Keep prefix_tokens [n, k] (e.g. the top rows) and sample the remaining T-k tokens."""
        p = np.asarray(prefix_tokens)
        p = validate_tokens(p[None] if p.ndim == 1 else p, self.tokenizer.vocab_size, max_length=self.seq_len,
                            what="prefix tokens")
        return self._generate(len(p), p, temperature, top_k, seed)

    def _generate(self, n, prefix, temperature, top_k, seed) -> np.ndarray:
        sampler.check_args(n, temperature, top_k, self.tokenizer.vocab_size, seed)
        runner = self.decode_runner if self.decode_runner is not None else self.score_runner
        return sampler.sample(runner, self.layout, int(n), self.seq_len, prefix, temperature, top_k, seed,
                              max_batch=self.max_batch)

    def close(self) -> None:
        self.score_runner = self.decode_runner = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Model(task={self.task.get('name')!r}, target={self.profile.name!r}, variant={self.variant!r}, "
                f"backend={self.backend['backend']!r}, providers={self.backend['providers']})")


def _check_consistency(d: Path, manifest: dict[str, Any], tok: TokenizerSpec) -> None:
    m = manifest["model"]
    if m["vocab_size"] != tok.vocab_size:
        raise ProjectableEdgeError(f"bundle {d}: model.vocab_size {m['vocab_size']} != tokenizer levels "
                                   f"{tok.vocab_size}; the bundle is inconsistent, regenerate it")
    if tok.seq_len > m["block_size"]:
        raise ProjectableEdgeError(f"bundle {d}: images have {tok.seq_len} tokens but model.block_size is "
                                   f"{m['block_size']}; regenerate the bundle")


def _which(d: Path, manifest: dict[str, Any], precision: str | None, candidate: str | None,
           tuned) -> tuple[str | None, dict[str, Any]]:
    """The candidate to open (None: the classic variant choice) and what happened with the tuned record.

    An explicit precision or candidate wins; otherwise a matching tuned record next to the bundle."""
    if candidate is not None:
        if precision is not None:
            raise ProjectableEdgeError("pass either precision= or candidate= (a candidate names its precision: "
                                       "SIZE/VARIANT), not both")
        return cands.resolve(manifest, candidate), {"used": False, "reason": "candidate given explicitly"}
    if precision is not None or tuned is False:
        return None, {"used": False, "reason": "precision given explicitly" if precision else "tuned=False"}
    from .tune import tuned_choice

    return tuned_choice(d, manifest, None if tuned is True else tuned)


def load(bundle_dir: str | Path, precision: str | None = None, providers=None, backend: str = "auto",
         threads: int | None = None, public_key=None, candidate: str | None = None, tuned=True) -> Model:
    """Verify and open a bundle.

    precision: graph variant ('fp32', 'fp16', 'int8-static', or a profile word like 'int8');
    default: the variant the manifest selected for the target.
    providers: onnxruntime execution providers (default: the target profile's, filtered by
    what this onnxruntime build has). backend: 'auto' (TensorRT engine when usable), or
    force 'onnxruntime' / 'tensorrt'. threads: onnxruntime intra-op threads (default: the
    profile's; 0 = onnxruntime's choice), e.g. to leave cores to the rest of the app.
    candidate: a (size, precision) candidate "SIZE/VARIANT" of the bundle (see `tune`).
    tuned: True = use the choice of `<bundle>.tuned.json` (written by `tune`) when neither precision nor
    candidate is given and the record still matches the bundle (a stale one is ignored with a
    TunedRecordWarning); False = ignore it; a path = read the record from there.
    """
    t0 = time.perf_counter()
    d = Path(bundle_dir)
    manifest = read_manifest(d, public_key=public_key)
    check_requirements(d, manifest)  # onnxruntime/python floors, before any session
    records = verify_files(d, manifest)
    profile = DeviceProfile.from_dict(manifest["target"], source=f"{d}/manifest.json 'target'")
    tok = TokenizerSpec.from_dict(manifest["tokenizer"])
    _check_consistency(d, manifest, tok)
    name, tuned_info = _which(d, manifest, precision, candidate, tuned)
    if name is not None:
        manifest, variant = cands.view(manifest, name)
        _check_consistency(d, manifest, tok)  # the candidate's own model facts
    else:
        variant = pick_variant(manifest, precision)
    score, decode, report = make_runners(d, manifest, variant, profile, providers, backend, threads,
                                          records=records)
    return Model(d, manifest, variant, profile, tok, score, decode, report, time.perf_counter() - t0,
                 candidate=name, tuned=tuned_info)
