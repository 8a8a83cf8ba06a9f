"""`adapt`: a new task from a folder of images, registered beside a finished run.

The source and the operator stay frozen; only the new task's embedding is fitted (see adapt.py),
and the operator turns it into the task's small model. `generate --task NAME` then ships it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.adapt import AdaptConfig, fit
from projectable_edge.data import IMAGE_SUFFIXES
from projectable_edge.task_registry import ROLE, check_name, register
from projectable_edge.train import load_run


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside a folder, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ProjectableEdgeError(f"--images {folder} is not a folder; give a folder of the new task's images")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
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
        except OSError as e:
            raise ProjectableEdgeError(f"cannot read image {f} ({e}); remove it or convert it to PNG") from None
    target = f"{'gray' if spec.channels == 1 else 'RGB'} {spec.width}x{spec.height}, {spec.levels} levels"
    return "; ".join(f"{n} {mode} {w}x{h}" for (mode, w, h), n in seen.most_common()) + f" -> {target}"


def adapt(run: Path, images: Path, name: str, cfg: AdaptConfig = AdaptConfig(), force: bool = False,
          log=print) -> dict:
    """Fit a new task to the images and register it as RUN/tasks/NAME; returns the record."""
    run = Path(run)
    meta, model, data = load_run(run)
    check_name(name, data.task_names, run, force)
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
        log(f"note: {len(files)} images are too few to hold some out (8 or more are needed), so the fit is not "
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
