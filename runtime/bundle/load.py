"""Load a bundle into a `Model`, the object an app embeds to score and sample on the device. `load` refuses
anything it cannot trust (manifest, schema, requirements, file hashes) before a single graph is opened.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..devices import variants
from ..devices.errors import ProjectableEdgeError
from ..devices.profiles import DeviceProfile
from ..graphs import sampler
from ..graphs.backends import Backend, make_runners
from ..graphs.contract import CacheLayout, check_facts
from .manifest import Candidate, Engine, Manifest, read_manifest, verify_files
from .requirements import check_requirements
from ..graphs.scoring import score_tokens
from ..graphs.tokenizer import TokenizerSpec, validate_tokens


def _array(x, what: str) -> np.ndarray:
    try:
        return np.asarray(x)
    except ValueError:  # nested lists of unequal lengths
        raise ProjectableEdgeError(f"{what} are ragged (rows of different lengths); pass one [N, T] token array "
                                   "or [N, H, W] uint8 images") from None


class _Closed:
    """Stands in for a closed Model's runners: any use says what happened instead of failing on None."""

    def __getattr__(self, name):
        raise ProjectableEdgeError("this Model is closed (close() or the end of its `with` block); load the bundle "
                                   "again to use it")


class Model:
    """One candidate of a bundle folder on its runners. `load` checks the folder first and makes one; generate
    measures its staged bundle with one before sealing. The engine applies to the main size only."""

    def __init__(self, bundle_dir: Path, name: str, candidate: Candidate, profile: DeviceProfile,
                 tokenizer: TokenizerSpec, engine: Engine | None = None, providers=None, backend: str = "auto",
                 threads: int | None = None, records=None, manifest: Manifest | None = None,
                 tuned: dict[str, Any] | None = None, t0: float | None = None):
        t0 = time.perf_counter() if t0 is None else t0
        runners, self.backend = make_runners(bundle_dir, candidate.graphs, candidate.variant,
                                             engine if candidate.main else None, profile, providers, backend,
                                             threads, records=records)
        self.score_runner, self.decode_runner = runners
        self.meta = dataclasses.asdict(candidate.model)
        for runner in (r for r in runners if r is not None):
            check_facts(runner, self.meta, f"manifest.json's 'model' of candidate {name}")
        self.load_time_s = time.perf_counter() - t0
        self.bundle_dir = bundle_dir
        self.manifest = manifest  # None while generate measures a bundle it has not sealed yet
        self.candidate = name  # "SIZE/VARIANT"
        self.entry = candidate
        self.tuned = tuned or {}  # what load() did with the tuned record next to the bundle
        self.variant = candidate.variant
        self.profile = profile
        self.tokenizer = tokenizer
        self.layout = CacheLayout.of(self.meta)
        # a TensorRT engine has a fixed max batch (the profile's, which built it): scoring and
        # sampling split larger batches; ORT just needs bounded memory
        trt = profile.tensorrt
        on_trt = trt and self.backend["backend"] == Backend.TENSORRT
        self.max_batch = int(trt.max_shapes.get("batch", 256)) if on_trt else 256

    @property
    def seq_len(self) -> int:
        return self.tokenizer.seq_len

    @property
    def task(self) -> dict[str, Any]:
        return dataclasses.asdict(self.manifest.task) if self.manifest else {}

    @property
    def goldens_path(self) -> Path:
        return self.bundle_dir / self.entry.goldens

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {"bundle": str(self.bundle_dir), "task": self.task, "target": self.profile.name,
                "candidate": self.candidate, "variant": self.variant, "selected": m.selected if m else None,
                "candidates": list(m.candidates) if m else [self.candidate], "tuned": self.tuned,
                "tokenizer": self.tokenizer.to_dict(), "model": self.meta, "backend": self.backend,
                "load_time_ms": self.load_time_s * 1e3}

    def to_tokens(self, x) -> np.ndarray:
        """uint8 arrays (or anything with >= 3 dims) are images; 1-D/2-D integer arrays are tokens."""
        a = _array(x, "images or tokens")
        if (a.dtype == np.int64 and a.ndim == 2 and a.shape[1] == self.seq_len and a.size
                and a.view(np.uint64).max() < self.tokenizer.vocab_size):
            return a  # fast path for the hot loop: one reduction (negatives wrap to huge)
        if a.dtype == np.uint8 or a.ndim >= 3:
            if a.ndim == 2 and a.shape[1] == self.seq_len:  # tokens saved compactly: encode would say "resize"
                raise ProjectableEdgeError(f"a uint8 array is read as images, and {a.shape} is not [N, "
                                           f"{', '.join(map(str, self.tokenizer.image_shape))}]; pass tokens "
                                           f"[N, {self.seq_len}] as int64: .astype(np.int64)")
            return self.tokenizer.encode(a)
        t = self.tokenizer.check_tokens(a)
        return t[None] if t.ndim == 1 else t

    def decode_images(self, tokens) -> np.ndarray:
        return self.tokenizer.decode(_array(tokens, "tokens"))

    def score(self, x) -> np.ndarray:
        """Bits per dimension per image, float64 [N], for tokens [N, T] or uint8 images."""
        t = self.to_tokens(x)
        return score_tokens(self.score_runner, np.ascontiguousarray(t), self.max_batch,
                            what=f"candidate '{self.candidate}'")

    def sample(self, n: int, temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
        """n new images as tokens [n, T]; deterministic for a seed."""
        return self._generate(n, None, temperature, top_k, seed)

    def complete(self, prefix_tokens, temperature: float = 1.0, top_k: int | None = None,
                 seed: int = 0) -> np.ndarray:
        """Keep prefix_tokens [n, k] (e.g. the top rows) and sample the remaining T-k tokens."""
        p = _array(prefix_tokens, "prefix tokens")
        p = validate_tokens(p[None] if p.ndim == 1 else p, self.tokenizer.vocab_size, max_length=self.seq_len,
                            what="prefix tokens")
        return self._generate(len(p), p, temperature, top_k, seed)

    def _generate(self, n, prefix, temperature, top_k, seed) -> np.ndarray:
        sampler.check_args(n, temperature, top_k, self.tokenizer.vocab_size, seed)
        runner = self.decode_runner if self.decode_runner is not None else self.score_runner
        return sampler.sample(runner, self.layout, int(n), self.seq_len, prefix, temperature, top_k, seed,
                              max_batch=self.max_batch)

    def close(self) -> None:
        self.score_runner = self.decode_runner = _Closed()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Model(task={self.task.get('name')!r}, target={self.profile.name!r}, candidate={self.candidate!r}, "
                f"backend={self.backend['backend']!r}, providers={self.backend['providers']})")


def _which(d: Path, manifest: Manifest, precision: str | None, candidate: str | None,
           tuned) -> tuple[str, dict[str, Any]]:
    """The candidate to open and what happened with the tuned record: an explicit precision or candidate
    wins; otherwise a matching tuned record next to the bundle; otherwise the manifest's selection."""
    for what, value, example in (("precision", precision, "'int8'"), ("candidate", candidate, "'64x4/int8-static'")):
        if value is not None and not isinstance(value, str):
            raise ProjectableEdgeError(f"{what} must be one name as a string, e.g. {example}; got "
                                       f"{type(value).__name__} {value!r}")
    if candidate is not None:
        if precision is not None:
            raise ProjectableEdgeError("pass either precision= or candidate= (a candidate names its precision: "
                                       "SIZE/VARIANT), not both")
        manifest.candidate(candidate)
        return candidate, {"used": False, "reason": "candidate given explicitly"}
    if precision is not None:  # the main size's variant: its exact name, or what the registry says the word means
        main = {c.variant: n for n, c in manifest.main_candidates().items()}
        found = variants.resolve(precision, main)
        if found is None:
            raise ProjectableEdgeError(f"precision {precision!r} is not in this bundle; available variants: "
                                       f"{', '.join(sorted(main))} (selected for the target: "
                                       f"{manifest.candidates[manifest.selected].variant})")
        return main[found], {"used": False, "reason": "precision given explicitly"}
    if tuned is False:
        return manifest.selected, {"used": False, "reason": "tuned=False"}
    if tuned is not True and (not isinstance(tuned, (str, Path)) or tuned == ""):
        raise ProjectableEdgeError(f"tuned must be True (use the tuned record next to the bundle), False (ignore "
                                   f"it) or the path of a tuned record, got {tuned!r}")
    from ..commands.tune import tuned_choice

    choice, info = tuned_choice(d, manifest, None if tuned is True else tuned)
    return choice or manifest.selected, info


def load(bundle_dir: str | Path, precision: str | None = None, providers=None, backend: str = "auto",
         threads: int | None = None, public_key=None, candidate: str | None = None, tuned=True) -> Model:
    """Verify and open a bundle's candidate: `candidate` ("SIZE/VARIANT"), or the main size's `precision` (a variant
    or a profile word like 'int8'), else the choice of a still-matching `<bundle>.tuned.json` (tuned=True; False:
    ignore it; a path: read it there), else the manifest's selection. backend: 'auto' (TensorRT engine when usable),
    'onnxruntime' or 'tensorrt'; providers and threads (0: onnxruntime's choice) default to the profile's.
    """
    t0 = time.perf_counter()
    manifest = read_manifest(bundle_dir, public_key=public_key)
    d = Path(bundle_dir)
    check_requirements(d, manifest.requires)  # onnxruntime/python floors, before any session
    records = verify_files(d, manifest)
    name, tuned_info = _which(d, manifest, precision, candidate, tuned)
    return Model(d, name, manifest.candidates[name], manifest.target, manifest.tokenizer, manifest.engine, providers,
                 backend, threads, records, manifest, tuned_info, t0)
