"""Safetensors checkpoints and JSON configs, written atomically and read without pickle."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.bundle.atomic import atomic_output

FORMAT = "projectable-edge"


def _metadata_sorted(data: bytes) -> bytes:
    """safetensors writes its metadata in hash order, which changes from call to call: sorted here, so the same
    tensors always give the same bytes (and the same sha256 in a run's config and a bundle's provenance)."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return data[:8] + text.ljust(n) + data[8 + n:] if len(text) <= n else data  # the same keys: the same length


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Write a safetensors file tagged with our format and its kind (e.g. 'run', 'projected')."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = _metadata_sorted(save(flat, metadata={"format": FORMAT, "kind": kind}))
    with atomic_output(path, overwrite=True) as tmp:  # Python writes: a full disk is an OSError (a user error,
        tmp.write_bytes(data)                          # "free some space"), not a SafetensorError (exit 1)


def load_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file of ours; a truncated or foreign file gets a clear error."""
    return read_tensors(path, kind)[0]


def read_tensors(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], str]:
    """load_tensors plus the file's sha256, from one read of the file."""
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"checkpoint not found: {path}")
    try:
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8:8 + n]).get("__metadata__") or {} if 8 <= len(raw) and n <= len(raw) - 8 else None
        tensors = load(raw) if meta is not None else None
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError, AttributeError) as e:
        meta, tensors, why = None, None, f" ({e})"
    else:
        why = ""
    if tensors is None:
        raise ProjectableEdgeError(
            f"{path} is not a readable safetensors checkpoint{why}; it may be truncated: "
            "re-run training or copy the file again")
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise ProjectableEdgeError(
            f"{path} is not a projectable-edge '{kind}' checkpoint (metadata {meta}); "
            "point at a run folder written by `projectable-edge train`")
    return tensors, hashlib.sha256(raw).hexdigest()


def save_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text + "\n")


RUN = "a run folder written by `projectable-edge train`"


def load_json(path: Path, what: str = RUN) -> dict:
    """A JSON object this project wrote; a missing file, bad JSON or another JSON value is refused.

    `what` names what the user should point at instead, e.g. "a run folder written by ...".
    """
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"{path} not found: give {what}")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProjectableEdgeError(f"{path} is not valid JSON ({e}): give {what}") from None
    if not isinstance(obj, dict):
        raise ProjectableEdgeError(f"{path} must be a JSON object written by projectable-edge, got "
                                   f"{json.dumps(obj)[:40]}: give {what}")
    return obj
