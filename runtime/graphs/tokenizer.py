"""Images <-> pixel-token sequences in numpy, so the device (no torch) quantizes exactly as training did.
Tokens are raster order, channels interleaved per pixel; level = round(x / 255 * (levels - 1)) half up, in integer
arithmetic so every platform gets the same tokens."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np

from ..devices.errors import ProjectableEdgeError


def validate_tokens(tokens, vocab_size: int, *, length: int | None = None, max_length: int | None = None,
                    allow_1d: bool = False, allow_empty: bool = True, what: str = "tokens",
                    hint: str = "") -> np.ndarray:
    """The one token validator: integer ids in 0..vocab_size-1, shaped [N, T] (or [T] with allow_1d), T equal to
    `length` / at most `max_length`; returns int64."""
    t = np.asarray(tokens)
    want = f"[{length}] or [N, {length}]" if allow_1d and length else f"[N, {length or 'T'}]"
    if t.ndim not in ((1, 2) if allow_1d else (2,)) or (length is not None and t.shape[-1] != length):
        raise ProjectableEdgeError(f"{what} have shape {tuple(t.shape)}, expected {want}{hint}")
    if not allow_empty and (t.shape[0] == 0 or t.shape[-1] == 0):
        raise ProjectableEdgeError(f"{what} must be a non-empty [N, T] array of token ids, got shape "
                                   f"{t.shape}; pass the task's token array (e.g. np.save of data tokens)")
    if not np.issubdtype(t.dtype, np.integer):
        raise ProjectableEdgeError(f"{what} must be integers, got dtype {t.dtype}; cast with .astype(np.int64)")
    if max_length is not None and t.shape[-1] > max_length:
        raise ProjectableEdgeError(f"{what} has sequences of {t.shape[-1]} tokens; the model takes at most "
                                   f"{max_length}")
    if t.size:
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= vocab_size:
            raise ProjectableEdgeError(
                f"{what} out of range: found min {lo}, max {hi}; valid range is 0..{vocab_size - 1} (the "
                f"model's vocabulary, levels = {vocab_size}); use tokens from the same tokenizer")
    return t.astype(np.int64, copy=False)


@dataclass(frozen=True)
class TokenizerSpec:
    height: int = field(metadata={"doc": "Image height in pixels.", "schema": {"minimum": 1}})
    width: int = field(metadata={"doc": "Image width in pixels.", "schema": {"minimum": 1}})
    channels: int = field(metadata={"doc": "1 (gray) or 3 (rgb), interleaved per pixel.", "schema": {"enum": [1, 3]}})
    levels: int = field(metadata={"doc": "Gray/colour levels per channel: the vocabulary size.",
                                  "schema": {"minimum": 2, "maximum": 256}})

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ProjectableEdgeError(f"tokenizer spec field '{f.name}' must be an integer, got {v!r} "
                                           f"({type(v).__name__})")
        if self.height < 1 or self.width < 1:
            raise ProjectableEdgeError(f"tokenizer spec 'height'/'width' must be >= 1, got {self.height}x{self.width}")
        if self.channels not in (1, 3):
            raise ProjectableEdgeError(f"tokenizer spec field 'channels' must be 1 (gray) or 3 (rgb), "
                                       f"got {self.channels}")
        if not 2 <= self.levels <= 256:
            raise ProjectableEdgeError(f"tokenizer spec field 'levels' must be in 2..256, got {self.levels}")

    @property
    def seq_len(self) -> int:
        return self.height * self.width * self.channels

    @property
    def vocab_size(self) -> int:
        return self.levels

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.height, self.width) if self.channels == 1 else (self.height, self.width, 3)

    def to_dict(self) -> dict:
        return {k: int(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerSpec":
        if not isinstance(d, dict):
            raise ProjectableEdgeError(f"tokenizer spec must be a JSON object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in d]
        unknown = sorted(set(d) - set(names))
        if missing:
            raise ProjectableEdgeError(f"tokenizer spec is missing field(s) {missing}; it needs {names}")
        if unknown:
            raise ProjectableEdgeError(f"tokenizer spec has unknown field(s) {unknown}; valid fields are {names}")
        return cls(**{n: d[n] for n in names})

    def encode(self, images) -> np.ndarray:
        """uint8 images [N,H,W] (gray) or [N,H,W,C] -> int64 tokens [N, seq_len]."""
        x = np.asarray(images)
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.integer) or (x.size and (x.min() < 0 or x.max() > 255)):
                unit = x.dtype == bool or (np.issubdtype(x.dtype, np.floating) and x.size and 0 <= x.min()
                                           and x.max() <= 1)  # 0..1 data: clipping would make it black
                raise ProjectableEdgeError(
                    f"images must be uint8 (0..255), got dtype {x.dtype}"
                    + (f" with values {x.min()}..{x.max()}" if x.size and np.issubdtype(x.dtype, np.number) else "")
                    + ("; scale 0..1 to 0..255 with (x * 255).round().astype(np.uint8)" if unit
                       else "; convert with np.clip(x, 0, 255).astype(np.uint8)"))
        if self.channels == 1 and x.ndim == 4 and x.shape[-1] == 1:
            x = x[..., 0]
        want = self.image_shape
        if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != want:
            raise ProjectableEdgeError(
                f"images have shape {tuple(x.shape)}, expected [N, {', '.join(map(str, want))}] "
                f"({'gray' if self.channels == 1 else 'rgb'} {self.height}x{self.width}); "
                "resize with load_images() or wrap a single image as images[None]")
        v = x.astype(np.int64).reshape(len(x), self.seq_len)
        v *= 2 * (self.levels - 1)  # in place: a large batch's memory is its tokens, not three int64 copies
        v += 255
        v //= 510
        return v  # floor(x*(L-1)/255 + 1/2)

    def check_tokens(self, tokens) -> np.ndarray:
        """Raise unless tokens are integer [seq_len] or [N, seq_len] in 0..levels-1; return int64."""
        return validate_tokens(tokens, self.levels, length=self.seq_len, allow_1d=True,
                               hint=f" (seq_len = {self.height}x{self.width}x{self.channels})")

    def decode(self, tokens) -> np.ndarray:
        """Tokens [N, seq_len] -> uint8 [N,H,W] / [N,H,W,3]; a single [seq_len] -> one image."""
        t = self.check_tokens(tokens)
        v = (t * 510 + (self.levels - 1)) // (2 * (self.levels - 1))  # round(level/(L-1)*255)
        return v.astype(np.uint8).reshape(t.shape[:-1] + self.image_shape)

    def load_images(self, paths: Iterable[str | Path]) -> np.ndarray:
        """Image files -> uint8 [N,H,W(,3)] at this spec's size and mode (Pillow imported here: scoring needs none)."""
        from PIL import Image

        paths = [Path(p) for p in paths]
        out = np.empty((len(paths),) + self.image_shape, dtype=np.uint8)
        for i, p in enumerate(paths):
            try:
                with Image.open(p) as im:
                    im.load()
                    out[i] = np.asarray(self.prepare_image(im))
            except ProjectableEdgeError as e:
                raise ProjectableEdgeError(f"cannot use image '{p}': {e}") from None
            except PermissionError as e:
                raise ProjectableEdgeError(f"cannot read image '{p}' ({e.strerror}): make it readable by this "
                                           "user") from None
            except Exception as e:  # Pillow raises many types for a bad file
                raise ProjectableEdgeError(
                    f"cannot read image '{p}': {type(e).__name__}: {e}; "
                    "replace or delete the file (PNG, JPEG, BMP, GIF, TIFF, WebP are supported)") from e
        return out

    def prepare_image(self, im):
        """One Pillow image -> this spec's size and colour mode (what load_images does per file)."""
        from PIL import Image, ImageOps

        # Reading only the first frame would silently score part of the file; a camera's JPEG (MPO) holds the
        # photo first and previews or depth maps after it.
        if getattr(im, "n_frames", 1) > 1 and im.format != "MPO":
            raise ProjectableEdgeError(f"it has {im.n_frames} frames (an animation or a multi-page file); save the "
                                       "one frame to use as a single image")
        # 16-bit gray (older Pillows open a PNG's as "I", Pillow a 16-bit PGM's as "I" scaled to 0..65535): scaled
        # to 0..255 below, where convert("L") would clip
        sixteen = im.mode.startswith("I;16") or (im.mode == "I" and im.format in ("PNG", "PPM"))
        if im.mode in ("I", "F") and not sixteen:  # 32-bit integer or float samples: no one scale fits every file
            lo, hi = im.getextrema()
            if im.mode == "F" or lo < 0 or hi > 255:
                raise ProjectableEdgeError(
                    f"it has 32-bit {'float' if im.mode == 'F' else 'integer'} pixels (values {lo:g}..{hi:g}), "
                    "which have no one scale to 0..255; save it as an 8- or 16-bit image (PNG, TIFF)")
        im = ImageOps.exif_transpose(im)
        if sixteen:  # a transparent grey (PNG tRNS) goes white, as in 8 bits below
            a, clear = np.asarray(im).astype(np.int64), im.info.get("transparency", -1)
            im = Image.fromarray(np.where(a == clear, 255, (a * 255 + 32767) // 65535).astype(np.uint8))
        if "A" in im.getbands() or "transparency" in im.info:  # flatten onto white, not onto junk RGB
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("L" if self.channels == 1 else "RGB")
        if im.size != (self.width, self.height):
            shrinking = im.width >= self.width and im.height >= self.height
            # BOX averages the covered pixels (no ringing on tiny targets); BICUBIC when enlarging.
            im = im.resize((self.width, self.height),
                           Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)
        return im
