"""Safetensors checkpoints and JSON configs, written atomically and read without pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.atomic import atomic_output

FORMAT = "projectable-edge"


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Write a safetensors file tagged with our format and its kind (e.g. 'run', 'projected')."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_output(path, overwrite=True) as tmp:
        save_file(flat, str(tmp), metadata={"format": FORMAT, "kind": kind})


def load_tensors(path: Path, kind: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file of ours; a truncated or foreign file gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProjectableEdgeError(
            f"{path} is not a readable safetensors checkpoint ({e}); it may be truncated: "
            "re-run training or copy the file again") from None
    if meta.get("format") != FORMAT or meta.get("kind") != kind:
        raise ProjectableEdgeError(
            f"{path} is not a projectable-edge '{kind}' checkpoint (metadata {meta}); "
            "point at a run folder written by `projectable-edge train`")
    return tensors


def save_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True)
    with atomic_output(path, overwrite=True) as tmp:
        tmp.write_text(text + "\n")


def load_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"{path} not found: is this a run folder written by `projectable-edge train`?")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProjectableEdgeError(f"{path} is not valid JSON ({e})") from None
