"""Loading ONNX and token files a user named: a missing, corrupt or foreign file is one ProjectableEdgeError,
not a protobuf trace. Also the graph facts and fingerprints the exporters' reports share."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnx

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.devices.variants import FP32, VARIANTS
from projectable_edge_runtime.graphs.tokenizer import validate_tokens


def load_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and fully check an ONNX file."""
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
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ProjectableEdgeError(f"{path} fails the ONNX checker ({e}); export it again") from None
    return model


def variant_of(model: onnx.ModelProto) -> str:
    """Which registry variant a graph is: the one whose marker ops it holds, else fp16 by its weights, else fp32."""
    ops = {n.op_type for n in model.graph.node}
    for v in VARIANTS.values():
        if ops & set(v.marker_ops):
            return v.name
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return next(v.name for v in VARIANTS.values() if v.family == "fp16")
    return FP32.name


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return users


@contextlib.contextmanager
def quiet():
    """The exporter and onnxruntime.quantization log advice and deprecations, and print progress."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def check_tokens(tokens, vocab_size: int, block_size: int, what: str = "tokens") -> np.ndarray:
    """A non-empty [N, T] array of ids in [0, vocab) with T <= block_size, as contiguous int64."""
    arr = validate_tokens(tokens, vocab_size, max_length=block_size, allow_empty=False, what=what)
    return np.ascontiguousarray(arr)


def tokens_sha256(tokens: np.ndarray) -> str:
    """Fingerprint of a token set: sha256 over its shape and its int64 little-endian bytes."""
    arr = np.ascontiguousarray(tokens, dtype="<i8")
    h = hashlib.sha256(repr(arr.shape).encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def load_tokens_npy(path: str | os.PathLike, what: str = "tokens") -> np.ndarray:
    """np.load without pickle."""
    path = Path(path)
    if not path.is_file():
        raise ProjectableEdgeError(f"{what} file not found: {path}; pass a .npy file of int token ids [N, T]")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ProjectableEdgeError(f"{path} is not a readable .npy token array ({e}); save it with "
                                   "np.save(path, tokens) from an int64 array") from None
