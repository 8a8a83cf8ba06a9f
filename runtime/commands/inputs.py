"""Images for an app, read one way: files, folders, .npy arrays, or .npy on stdin -> named token rows.

`read_inputs` takes anything with `.tokenizer` and `.to_tokens` (a loaded Model, or an app wrapping one, as in
examples/); Pillow is needed only for image files."""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path

import numpy as np

from ..bundle.manifest import os_clutter
from ..devices.errors import ProjectableEdgeError

# the one list (training folders, `adapt`, `score`)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def visible_files(folder: Path) -> list[Path]:
    """The files directly inside a folder, sorted, hidden ones and file managers' clutter (`.DS_Store`, macOS `._*`,
    `Thumbs.db`) left out: how every folder of images is read (training, `adapt`, `score`)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not os_clutter(p.name))


def read_npy(data: bytes, what: str) -> np.ndarray:
    """The bytes of a .npy file as an array, its header checked first: the array it declares must be the bytes
    that follow (np.load would allocate whatever a 100-byte header declares), with no Python objects in it."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0)(f)
    except Exception as e:  # numpy parses the header as a Python literal: any error there means not a .npy
        raise ProjectableEdgeError(f"{what} is not a .npy array ({type(e).__name__}: {e}); pass np.save output "
                                   "(uint8 images [N, H, W] or int tokens [N, T])") from None
    if dtype.hasobject:
        raise ProjectableEdgeError(f"{what} holds Python objects (a pickle); pass an array of integers")
    if dtype.kind not in "biufc" or not dtype.itemsize:  # records, strings, zero-width types: not pixels or tokens
        raise ProjectableEdgeError(f"{what} holds {dtype.str!r} values, not numbers; pass uint8 images or int tokens")
    body = len(data) - f.tell()
    if min(shape, default=0) < 0 or math.prod(shape) * dtype.itemsize != body:
        raise ProjectableEdgeError(f"{what}: the .npy header declares shape {shape} of {dtype}, but {body} bytes "
                                   "follow it; pass np.save output, whole")
    a = np.frombuffer(data, dtype, offset=f.tell()).reshape(shape, order="F" if fortran else "C")
    return a.copy() if fortran else a  # C order either way (np.ascontiguousarray made a 0-d array 1-d)


def _npy_rows(model, data: bytes, name: str, what: str) -> list[tuple[str, np.ndarray]]:
    """A .npy array -> (name[i], tokens [1, T]) per row, N >= 1; a single uint8 image [H, W(, C)] is a batch of one."""
    a = read_npy(data, what)
    if a.dtype == np.uint8 and a.shape == tuple(model.tokenizer.image_shape):
        a = a[None]
    tokens = model.to_tokens(a)
    if not len(tokens):
        raise ProjectableEdgeError(f"{what} holds no images (shape {a.shape}); pass at least one")
    return [(name if len(tokens) == 1 else f"{name}[{i}]", tokens[i:i + 1]) for i in range(len(tokens))]


def _read_file(model, path: Path) -> list[tuple[str, np.ndarray]]:
    if path.suffix.lower() == ".npy":
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ProjectableEdgeError(f"cannot read '{path}' ({e.strerror}); check its permissions") from None
        return _npy_rows(model, data, str(path), f"'{path}'")
    try:
        images = model.tokenizer.load_images([path])
    except ImportError:
        raise ProjectableEdgeError(f"reading '{path}' needs Pillow: `pip install pillow`, or pass .npy files") from None
    return [(str(path), model.tokenizer.encode(images))]


def read_inputs(model, paths: list[str]) -> list[tuple[str, np.ndarray]]:
    """(name, tokens [1, T]) for every image: files, folders (the images and .npy files directly inside, hidden ones
    skipped), '-' = .npy on stdin."""
    out = []
    for p in paths:
        if p == "-":
            if sys.stdin is None:  # started with stdin closed (`<&-`, some service managers)
                raise ProjectableEdgeError("'-' reads .npy from stdin, but this process has no stdin; pipe the array "
                                           "in (np.save output) or pass files")
            out += _npy_rows(model, sys.stdin.buffer.read(), "stdin", "stdin")
        elif not p:  # Path("") is the current folder
            raise ProjectableEdgeError("an input path is empty; pass image files, a folder, or '-' for .npy on stdin")
        elif (path := Path(p)).is_dir():
            files = [f for f in visible_files(path) if f.suffix.lower() in (".npy", *IMAGE_SUFFIXES)]
            if not files:
                raise ProjectableEdgeError(f"folder '{path}' holds no images (.npy, .png, .jpg, ...)")
            for f in files:
                out += _read_file(model, f)
        elif path.is_file():
            out += _read_file(model, path)
        else:
            raise ProjectableEdgeError(f"input '{p}' not found; pass image files, a folder, or '-' for .npy on stdin")
    return out
