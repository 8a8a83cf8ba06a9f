"""A minimal PNG writer (stdlib zlib/struct + numpy), so `sample` works on a device without Pillow."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from ..devices.errors import ProjectableEdgeError
from ..bundle.atomic import atomic_output


def png_bytes(image) -> bytes:
    """Encode a uint8 [H,W] or [H,W,3] array as 8-bit gray / RGB PNG bytes."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ProjectableEdgeError(f"PNG image must be uint8, got dtype {a.dtype}; "
                                   "convert with np.clip(x, 0, 255).astype(np.uint8)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.shape[0] < 1 or a.shape[1] < 1:
        raise ProjectableEdgeError(f"PNG image has shape {a.shape}, expected [H, W] (gray) or [H, W, 3] (rgb)")
    h, w = a.shape[:2]
    raw = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, -1)], axis=1).tobytes()  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0 if a.ndim == 2 else 2, 0, 0, 0)  # 8-bit gray or RGB
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 9))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png(path: str | Path, image) -> Path:
    """Write atomically (temp file + os.replace): a crash never leaves a truncated PNG."""
    data = png_bytes(image)
    with atomic_output(Path(path), overwrite=True) as tmp:
        tmp.write_bytes(data)
    return Path(path)


MAX_GRID_PIXELS = 1 << 26  # 64 Mpx (8192 x 8192): a larger grid is a typo in --scale or -n, not a picture


def grid_size(n: int, image_hw: tuple[int, int], cols: int, pad: int = 1, scale: int = 1) -> tuple[int, int, int, int]:
    """(rows, cols, height, width) in pixels of a grid of n images, checked before anything is drawn (or sampled)."""
    for name, v, lo in (("--cols", cols, 1), ("pad", pad, 0), ("--scale", scale, 1)):
        if int(v) != v or v < lo:
            raise ProjectableEdgeError(f"the grid's {name} must be an integer >= {lo}, got {v!r}")
    cols = min(int(cols), n)
    rows = -(-n // cols)
    h, w = image_hw[0] * scale, image_hw[1] * scale
    size = (rows, cols, rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad)
    if size[2] * size[3] > MAX_GRID_PIXELS:
        raise ProjectableEdgeError(f"a grid of {n} images at scale {scale} would be {size[3]} x {size[2]} pixels, "
                                   f"over {MAX_GRID_PIXELS:,}; use a smaller --scale or fewer images")
    return size


def image_grid(images, cols: int, pad: int = 1, scale: int = 1, *, pad_value: int = 128) -> np.ndarray:
    """Tile [N,H,W] or [N,H,W,3] uint8 images row-major into one image, each upscaled `scale` times (8x8 digits
    are unreadable otherwise), framed by `pad` pixels of `pad_value` (mid-gray: visible on dark and light)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise ProjectableEdgeError(f"grid images must be uint8, got dtype {x.dtype}")
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))) or len(x) == 0:
        raise ProjectableEdgeError(f"grid images have shape {x.shape}, expected [N, H, W] or [N, H, W, 3] with N >= 1")
    if x.ndim == 4 and x.shape[3] == 1:
        x = x[..., 0]
    if not 0 <= pad_value <= 255:
        raise ProjectableEdgeError(f"image_grid 'pad_value' must be in 0..255, got {pad_value}")
    n = len(x)
    _, cols, height, width = grid_size(n, x.shape[1:3], cols, pad, scale)
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = x.shape[1:3]
    out = np.full((height, width) + x.shape[3:], pad_value, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = x[i]
    return out
