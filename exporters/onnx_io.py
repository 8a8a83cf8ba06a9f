"""Loading ONNX files and opening ONNX Runtime sessions with errors a user can act on.

Every later step (parity, quantization, compile) takes a path a user typed, so a
missing, corrupt or foreign file must become one ProjectableEdgeError, not a protobuf trace.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx

from devices.errors import ProjectableEdgeError
from runtime.manifest import sha256_file  # noqa: F401  (re-exported: the bundle's one file hash)


def file_info(path: str | os.PathLike) -> dict:
    """{'sha256', 'bytes'} of a file, as the bundle manifest records it."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def load_onnx(path: str | os.PathLike, check: bool = True) -> onnx.ModelProto:
    """Read and (by default) fully check an ONNX file; anything wrong is a ProjectableEdgeError."""
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"ONNX file not found: {path}; check the path "
                                   "(`projectable-edge export` writes scoring.onnx and decode.onnx)")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, UnicodeDecodeError, ...
        raise ProjectableEdgeError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); "
                                   "it may be truncated or another format: export it again") from None
    if not model.graph.node or not model.graph.output:
        raise ProjectableEdgeError(f"{path} holds no ONNX graph (no nodes or outputs); "
                                   "it is not an ONNX model: export it again")
    if check:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as e:
            raise ProjectableEdgeError(f"{path} fails the ONNX checker ({e}); export it again") from None
    return model


def graph_kind(model: onnx.ModelProto) -> str:
    """'scoring' (tokens -> logits) or 'decode' (token + KV cache); anything else is an error."""
    names = {i.name for i in model.graph.input}
    if names == {"tokens"}:
        return "scoring"
    if names == {"token", "past_keys", "past_values"}:
        return "decode"
    raise ProjectableEdgeError(f"ONNX graph inputs {sorted(names)} are neither a scoring graph ('tokens') nor "
                               "a decode graph ('token', 'past_keys', 'past_values'); use a graph written by "
                               "`projectable-edge export`")


def make_session(path_or_bytes, threads: int = 1, providers: list[str] | None = None,
                 optimization: str = "all"):
    """An ONNX Runtime session. One thread by default: validation runs tiny graphs on shared CPUs."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[optimization]
    src = str(path_or_bytes) if isinstance(path_or_bytes, (str, os.PathLike)) else path_or_bytes
    try:
        return ort.InferenceSession(src, so, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        where = src if isinstance(src, str) else "<in-memory model>"
        raise ProjectableEdgeError(f"ONNX Runtime cannot load {where} ({e}); "
                                   "re-export it or pick a precision this build supports") from None


def check_tokens(tokens, vocab_size: int, block_size: int, what: str = "tokens") -> np.ndarray:
    """Validate a token array ([N, T] ints in [0, vocab)); returns it as contiguous int64."""
    arr = np.asarray(tokens)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ProjectableEdgeError(f"{what} must be a non-empty [N, T] array of token ids, got shape "
                                   f"{arr.shape}; pass the task's token array (e.g. np.save of data tokens)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ProjectableEdgeError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    if arr.shape[1] > block_size:
        raise ProjectableEdgeError(f"{what} has sequences of {arr.shape[1]} tokens; the model takes at most "
                                   f"{block_size}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        raise ProjectableEdgeError(f"{what} holds ids in [{lo}, {hi}] but the model's vocabulary is "
                                   f"[0, {vocab_size - 1}]; use tokens from the same tokenizer")
    return np.ascontiguousarray(arr, dtype=np.int64)


def tokens_sha256(tokens: np.ndarray) -> str:
    """Fingerprint of a token set: sha256 over its shape and its int64 little-endian bytes."""
    arr = np.ascontiguousarray(tokens, dtype="<i8")
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def load_tokens_npy(path: str | os.PathLike, what: str = "tokens") -> np.ndarray:
    """np.load without pickle; a missing or unreadable file is a ProjectableEdgeError."""
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"{what} file not found: {path}; pass a .npy file of int token ids [N, T]")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ProjectableEdgeError(f"{path} is not a readable .npy token array ({e}); save it with "
                                   "np.save(path, tokens) from an int64 array") from None
