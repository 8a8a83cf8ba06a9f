"""A new task from a handful of images: fit a few parameters of one role, everything else frozen.

`fit(model, role, images, cfg)` is the one fitting loop behind `projectable-edge adapt` and its
leave-one-out benchmark. What it fits (`cfg.fit`):
- "embedding": only the task vector. For the projected role that is the source's task embedding,
  so the frozen operator turns it into a whole small model in one shot; for the universal role it
  is the universal model's task (BOS) vector; for the source it is the source's task embedding.
- "norms": the task vector plus additive deltas on the small model's norm gains and biases.
- "all": the task vector plus deltas on every weight of the small model (a fine-tune).
With weights to fit, the first half of the steps fits the task vector alone and the second half
fine-tunes from the best of the first: the projection is the fine-tune's starting point.
The model itself is never modified: deltas live beside it, and the source and operator weights
are bit-identical before and after (tested).

The task vector starts from the nearest trained task (the one whose model of this role scores
the given images best), so an adaptation starts where the zero-shot choice ends. When there are
enough images, a part is held out and the fit keeps its best step on them (early stopping).

`adapt(run, images, name)` (the `adapt` command) reads a folder of images with the run's tokenizer, fits
the projected role, and registers the task beside the run (task_registry.py), whole or not at all.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from projectable_edge.choices import Fit
from projectable_edge_runtime.devices.choices import values
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.data import check_seed, shift_augment
from projectable_edge.model import SpecialisedModel, Weights, bits_per_dim, forward, init_weights, nll
from projectable_edge.trainables import Trainables, role_generator, split_role
from projectable_edge_runtime.commands.inputs import IMAGE_SUFFIXES, visible_files
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec

FITS = values(Fit)
MIN_IMAGES = 3
MAX_LR = 1.0  # Adam's step is about lr per weight: past 1 it only diverges
_NORMS_AND_BIASES = ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "lnf.w", "lnf.b", "bq", "bk", "bv", "bo", "b1", "b2", "head_b")


@dataclass(frozen=True)
class AdaptConfig:
    steps: int = 200
    lr: float = 3e-3  # Adam, for the task vector
    weight_lr: float = 1e-3  # Adam, for weight deltas ("norms", "all") and for a model from scratch
    fit: str = "all"  # embedding + every small weight: the best at k = 20 (README, adapt)
    min_images: int = MIN_IMAGES
    val_images: int = 0  # images held out for early stopping; 0: automatic (a fifth, from 5 images on)
    eval_every: int = 10
    shift: int = 1  # random pixel shifts of the training images, as in training
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ProjectableEdgeError(f"adapt 'fit' must be one of {FITS}, got {self.fit!r}")
        for name in ("steps", "eval_every", "min_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProjectableEdgeError(f"adapt '{name}' must be a positive integer, got {v!r}")
        for name in ("lr", "weight_lr"):
            v = getattr(self, name)
            if not 0 < v <= MAX_LR:  # NaN and inf too
                raise ProjectableEdgeError(f"adapt '{name}' must be a number in (0, {MAX_LR:g}], got {v!r}")
        if min(self.val_images, self.shift) < 0:
            raise ProjectableEdgeError("adapt 'val_images' and 'shift' must be >= 0")
        check_seed("adapt 'seed'", self.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    def n_val(self, n: int) -> int:
        """How many of n images are held out for early stopping."""
        if self.val_images:
            if self.val_images > n - 1:
                raise ProjectableEdgeError(f"cannot hold out {self.val_images} of {n} images for early stopping; "
                                           "pass fewer --val-images or more images")
            return self.val_images
        return max(1, n // 5) if n >= 5 else 0


@dataclass(frozen=True)
class Adapted:
    """The outcome of one fit: the role's task vector and weight deltas, with its record."""
    role: str
    vector: torch.Tensor  # [d_role]: the task embedding (projected/source) or BOS vector (universal)
    deltas: dict[str, torch.Tensor]  # weight name -> delta (empty for fit="embedding")
    nearest: int  # the trained task the fit started from
    nearest_bits: float  # its model's bits/dim on the held-out part (all images when none is held out)
    bits: float  # the fitted model's bits/dim on the same images
    curve: list[dict]
    seconds: float
    seed: int  # a model from scratch is rebuilt from it
    check: tuple[int, ...] = ()  # indices of the given images held out for early stopping


class _RoleModel:
    """One role's small model as a differentiable function of (task vector, weight deltas)."""

    def __init__(self, model: Trainables, role: str, generator: torch.Generator):
        self.model, self.role = model, role
        self.base, _ = split_role(role)
        self.cfg = model.config_of(role)
        if self.base == "scratch":  # a fresh small model: no trained task to start from
            self.fresh = init_weights(self.cfg, generator)
        operator, w, vecs = (None, None, None) if self.base in ("source", "scratch") else model.parts(role)
        self.operator, self.weights = operator, w
        self.vectors = model.source_task if self.base in ("source", "projected") else vecs

    def task_vectors(self) -> torch.Tensor:
        """[n_task, d]: the trained tasks' vectors of this role (scratch: one zero vector)."""
        if self.base == "scratch":
            return torch.zeros(1, self.cfg.d_model)
        return self.vectors.detach()

    def build(self, vec: torch.Tensor) -> tuple[Weights, torch.Tensor]:
        """vec [n, d] -> (weights, bos [n, d_small]); weights carry a leading [n] dim for projected."""
        if self.base == "source":
            return self.model.source.weights(), vec
        if self.base == "scratch":
            return self.fresh, vec
        if self.operator is not None:
            return self.operator(self.model.source.weights(), vec)
        return self.weights, vec

    def logits(self, vec: torch.Tensor, deltas: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        w, bos = self.build(vec[None])
        w = {k: (v[0] if self.operator is not None else v) for k, v in w.items()}
        w = {k: v + deltas[k] if k in deltas else v for k, v in w.items()}
        return forward(w, self.cfg, tokens, bos[0].expand(tokens.shape[0], -1))

    def bits_by_task(self, tokens: torch.Tensor) -> torch.Tensor:
        """Macro bits/dim of the tokens under every trained task's model of this role: [n_task]."""
        vecs = self.task_vectors()
        out = []
        with torch.no_grad():
            for v in vecs:
                out.append(bits_per_dim(self.logits(v, {}, tokens), tokens).mean())
        return torch.stack(out)


def _trainable_deltas(rm: _RoleModel, fit: str) -> dict[str, torch.Tensor]:
    if rm.base == "scratch":
        fit = "all"
    if fit == "embedding" or rm.base == "source":
        return {}
    with torch.no_grad():
        w, _ = rm.build(rm.task_vectors()[:1])
    local = lambda k: k.split(".", 1)[1] if k[0] == "h" and k[1].isdigit() else k  # "h0.ln1.w" -> "ln1.w"  # noqa: E731
    names = [k for k in w if fit == "all" or local(k) in _NORMS_AND_BIASES]
    shape = lambda k: w[k].shape[1:] if rm.operator is not None else w[k].shape  # noqa: E731
    return {k: torch.zeros(shape(k), requires_grad=True) for k in names}


def _val_bits(rm: _RoleModel, vec: torch.Tensor, deltas: dict, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float(bits_per_dim(rm.logits(vec, deltas, tokens), tokens).mean())


def fit(model: Trainables, role: str, tokens: np.ndarray, spec: TokenizerSpec, cfg: AdaptConfig) -> Adapted:
    """Fit one role's new task to `tokens` [n, T] (the model stays untouched); see the module doc."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)  # frozen: no gradient is computed for, or stored on, the run's weights
    try:
        return _fit(model, role, tokens, spec, cfg)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def _fit(model: Trainables, role: str, tokens: np.ndarray, spec: TokenizerSpec, cfg: AdaptConfig) -> Adapted:
    n = len(tokens)
    if n < cfg.min_images:
        raise ProjectableEdgeError(f"adapting needs at least {cfg.min_images} images, got {n}; add images")
    start = time.perf_counter()
    x_all = torch.as_tensor(tokens, dtype=torch.long)
    n_val = cfg.n_val(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    x_fit = x_all[perm[n_val:]]
    g = role_generator(cfg.seed, f"adapt/{role}")
    rm = _RoleModel(model, role, g)
    by_task = rm.bits_by_task(x_fit)
    nearest = int(by_task.argmin())
    run = _Descent(rm, x_fit, x_all[perm[:n_val]] if n_val else x_fit, bool(n_val), spec, g, cfg)
    run.start(rm.task_vectors()[nearest], float(by_task[nearest]))
    deltas = _trainable_deltas(rm, cfg.fit)
    if deltas and rm.base != "scratch":  # the projection (or task vector) first, then the weights from there
        run.phase(cfg.steps // 2, {})
        run.phase(cfg.steps - cfg.steps // 2, deltas)
    else:
        run.phase(cfg.steps, deltas)
    best = run.best
    return Adapted(role=role, vector=best["vec"], deltas=best["deltas"], nearest=nearest,
                   nearest_bits=run.curve[0]["check"], bits=best["check"], curve=run.curve,
                   seconds=time.perf_counter() - start, seed=cfg.seed, check=tuple(int(i) for i in perm[:n_val]))


class _Descent:
    """Adam on a task vector (and weight deltas), keeping the best step on the check images."""

    def __init__(self, rm: _RoleModel, x_fit, x_check, held_out: bool, spec, g, cfg: AdaptConfig):
        self.rm, self.x_fit, self.x_check, self.held_out = rm, x_fit, x_check, held_out
        self.spec, self.g, self.cfg = spec, g, cfg
        self.step, self.curve, self.best = 0, [], {}

    def _keep(self, vec, deltas, check: float, fit_bits: float) -> None:
        self.curve.append({"step": self.step, "fit": fit_bits, "check": check})
        if not self.best or check < self.best["check"] or not self.held_out:  # no check images: keep the last
            self.best = {"check": check, "vec": vec.detach().clone(), "step": self.step,
                         "deltas": {k: d.detach().clone() for k, d in deltas.items()}}

    def start(self, vec, fit_bits: float) -> None:
        self._keep(vec, {}, _val_bits(self.rm, vec, {}, self.x_check), fit_bits)

    def phase(self, steps: int, deltas: dict[str, torch.Tensor]) -> None:
        """`steps` Adam steps from the best state so far, fitting the task vector and `deltas`."""
        vec = self.best["vec"].clone().requires_grad_(True)
        with torch.no_grad():
            for k, d in deltas.items():
                d.copy_(self.best["deltas"].get(k, torch.zeros_like(d)))
        groups = [{"params": [vec], "lr": self.cfg.lr}]
        if deltas:
            groups.append({"params": list(deltas.values()), "lr": self.cfg.weight_lr})
        opt = torch.optim.Adam(groups)
        for i in range(1, steps + 1):
            self.step += 1
            x = shift_augment(self.x_fit, self.spec, self.g, max_shift=self.cfg.shift) if self.cfg.shift else self.x_fit
            loss = nll(self.rm.logits(vec, deltas, x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i % self.cfg.eval_every == 0 or i == steps:
                self._keep(vec, deltas, _val_bits(self.rm, vec, deltas, self.x_check), float(loss.detach()) / np.log(2))


def adapted_model(model: Trainables, role: str, adapted: Adapted):
    """The deployable small model of an adaptation: (config, weights, bos)."""
    rm = _RoleModel(model, role, role_generator(adapted.seed, f"adapt/{role}"))
    with torch.no_grad():
        w, bos = rm.build(adapted.vector[None])
        w = {k: (v[0] if rm.operator is not None else v) for k, v in w.items()}
        w = {k: v + adapted.deltas[k] if k in adapted.deltas else v.clone() for k, v in w.items()}
    return rm.cfg, w, bos[0]


def score(model: Trainables, role: str, adapted: Adapted, tokens: np.ndarray) -> float:
    """Macro bits/dim of an adapted model on other images of the task."""
    return float(SpecialisedModel(*adapted_model(model, role, adapted)).bits(tokens).mean())


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside a folder, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProjectableEdgeError(f"--images {folder} is not a folder; give a folder of the new task's images")
    files = [p for p in visible_files(folder) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ProjectableEdgeError(f"--images {folder} has no images with a suffix in {', '.join(IMAGE_SUFFIXES)}")
    return files


def conversions(files: list[Path], spec) -> str:
    """What reading the files does to them, in words (e.g. '20 RGB 28x28 -> gray 8x8, 17 levels')."""
    from PIL import Image

    seen = Counter()
    for f in files:
        try:
            with Image.open(f) as im:
                seen[(im.mode, im.width, im.height)] += 1
        except Exception as e:  # Pillow raises many types for a bad file (a decompression bomb is no OSError)
            raise ProjectableEdgeError(f"cannot read image {f} ({e}); remove it or convert it to PNG") from None
    target = f"{'gray' if spec.channels == 1 else 'RGB'} {spec.width}x{spec.height}, {spec.levels} levels"
    return "; ".join(f"{n} {mode} {w}x{h}" for (mode, w, h), n in seen.most_common()) + f" -> {target}"


def adapt(run: Path, images: Path, name: str, cfg: AdaptConfig = AdaptConfig(), force: bool = False,
          log=print) -> dict:
    """Fit a new task to the images and register it as RUN/tasks/NAME; returns the record."""
    run = Path(run)
    from projectable_edge.task_registry import ROLE, check_name, check_writable, register
    from projectable_edge.train import load_run

    meta, model, data = load_run(run)
    check_name(name, data.task_names, run, force)
    check_writable(run)
    files = image_files(images)
    if len(files) < cfg.min_images:
        raise ProjectableEdgeError(f"--images {images} has {len(files)} image(s); adapting needs at least "
                                   f"{cfg.min_images}")
    converted = conversions(files, data.spec)
    tokens = data.spec.encode(data.spec.load_images(files))
    log(f"read {len(files)} images ({converted})")
    a = fit(model, ROLE, tokens, data.spec, cfg)
    nearest = data.task_names[a.nearest]
    record = {
        "images": [{"file": f.name, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files],
        "n_images": len(files), "n_check": len(a.check), "conversion": converted, "fit": cfg.to_dict(),
        "nearest_task": nearest, "nearest_bits": a.nearest_bits, "bits": a.bits, "curve": a.curve,
        "seconds": a.seconds, "source_run": meta.get("dataset_fingerprint"),
    }
    if not a.check:
        log(f"note: {len(files)} images are too few to hold some out (5 or more are needed), so the fit is not "
            "checked on unseen images; its numbers are on the images it was fitted to")
    elif a.bits >= a.nearest_bits and not force:
        raise ProjectableEdgeError(
            f"the adapted task is no better than the nearest trained task '{nearest}' on the {len(a.check)} held-out "
            f"images ({a.bits:.4f} vs {a.nearest_bits:.4f} bits/dim); nothing was registered. If these images are of "
            f"that task, use it (`generate --task {nearest}`); otherwise add more images, or pass --force to "
            "register it anyway")
    dest = register(run, name, a, tokens, np.asarray(a.check, dtype=np.int64), record, overwrite=force)
    log(f"registered task {name!r} at {dest}: {a.bits:.4f} bits/dim on {len(a.check) or len(files)} "
        f"{'held-out' if a.check else 'fitted'} images (nearest trained task '{nearest}': {a.nearest_bits:.4f}); "
        f"fit {a.seconds:.1f} s")
    return {"task": name, "folder": str(dest), **{k: v for k, v in record.items() if k not in ("curve", "images")}}
