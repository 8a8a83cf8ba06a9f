"""Images for an app, read one way: files, folders, .npy arrays, or .npy on stdin -> named token rows.

`read_inputs` takes anything with `.tokenizer` and `.to_tokens` (a loaded Model, or an app wrapping one, as in
examples/); Pillow is needed only for image files."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from ..devices.errors import ProjectableEdgeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")  # the one list


def _token_rows(model, source, name: str) -> np.ndarray:
    """A .npy array -> tokens [N, T]; a single uint8 image [H, W(, C)] becomes a batch of one."""
    try:
        a = np.load(source, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ProjectableEdgeError(f"cannot read {name} as a .npy array ({e}); pass np.save output "
                                   "(uint8 images [N, H, W] or int tokens [N, T])") from None
    if a.dtype == np.uint8 and a.shape == tuple(model.tokenizer.image_shape):
        a = a[None]
    return model.to_tokens(a)


def _named(name: str, tokens: np.ndarray) -> list[tuple[str, np.ndarray]]:
    return [(name if len(tokens) == 1 else f"{name}[{i}]", tokens[i:i + 1]) for i in range(len(tokens))]


def _read_file(model, path: Path) -> list[tuple[str, np.ndarray]]:
    if path.suffix.lower() == ".npy":
        return _named(str(path), _token_rows(model, str(path), f"'{path}'"))
    try:
        images = model.tokenizer.load_images([path])
    except ImportError:
        raise ProjectableEdgeError(f"reading '{path}' needs Pillow: `pip install pillow`, or pass .npy files") from None
    return [(str(path), model.tokenizer.encode(images))]


def read_inputs(model, paths: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, tokens [1, T]) for every image: files, folders (images and .npy inside), '-' = .npy on stdin."""
    out = []
    for p in paths:
        if p == "-":
            out += _named("stdin", _token_rows(model, io.BytesIO(sys.stdin.buffer.read()), "stdin"))
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix.lower() in (".npy", *IMAGE_SUFFIXES))
            if not files:
                raise ProjectableEdgeError(f"folder '{path}' holds no images (.npy, .png, .jpg, ...)")
            for f in files:
                out += _read_file(model, f)
        elif path.is_file():
            out += _read_file(model, path)
        else:
            raise ProjectableEdgeError(f"input '{p}' not found; pass image files, a folder, or '-' for .npy on stdin")
    return out
