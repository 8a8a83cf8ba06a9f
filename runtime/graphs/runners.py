"""The one ONNX Runtime session factory and runner. A runner (Polygraphy's idea) is anything with `name`,
`providers` (what really executes), `input_names`, `output_names`, `input_dtypes` and `run(feed) -> {name: array}`:
ONNX Runtime, TensorRT, the PyTorch reference and onnx.reference all run through it, so parity, calibration and
sampling are written once."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..devices.choices import StrEnum, choose
from ..devices.errors import ProjectableEdgeError
from ..bundle.requirements import import_onnxruntime
from .contract import SPEC_KEY

ort = import_onnxruntime()  # one clear error when onnxruntime cannot import (e.g. <1.19 with numpy 2)

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


class OptLevel(StrEnum):
    """ONNX Runtime graph optimization levels."""

    DISABLE = "disable"
    BASIC = "basic"
    EXTENDED = "extended"
    ALL = "all"

    @property
    def ort(self) -> "ort.GraphOptimizationLevel":
        name = "ORT_DISABLE_ALL" if self is OptLevel.DISABLE else f"ORT_ENABLE_{self.name}"
        return getattr(ort.GraphOptimizationLevel, name)


def ort_session(src, *, providers=None, threads: int = 0, optimization: str = "all",
                save_optimized: str | os.PathLike | None = None, ort_format: bool = False):
    """An onnxruntime.InferenceSession; every session in the project is opened here. Idle threads sleep (no
    spinning that starves small shared CPUs). save_optimized: also write the optimized graph there (`ort_format`:
    as a .ort flatbuffer)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only; reports say which providers ran
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.inter_op_num_threads = 1
    if threads > 0:
        so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = choose(OptLevel, optimization, "optimization level").ort
    if save_optimized is not None:
        so.optimized_model_filepath = str(save_optimized)
        if ort_format:
            so.add_session_config_entry("session.save_model_format", "ORT")
    is_path = isinstance(src, (str, os.PathLike))
    try:
        return ort.InferenceSession(str(src) if is_path else src, sess_options=so,
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # ORT raises its own pybind types (InvalidGraph, Fail, ...)
        raise ProjectableEdgeError(f"onnxruntime cannot load graph '{src if is_path else '<in-memory model>'}': "
                                   f"{e}; the file may be corrupt, need a newer onnxruntime, or use a precision "
                                   "this build lacks - export it again") from None


class OrtRunner:
    """One onnxruntime session behind the runner contract; `providers` is what it really uses."""

    def __init__(self, path: str | Path, providers=None, threads: int = 0, name: str | None = None):
        self.path = Path(path)
        self.name = name or f"onnxruntime:{self.path.name}"
        available = ort.get_available_providers()
        requested = list(providers or ["CPUExecutionProvider"])
        self.missing_providers = [p for p in requested if p not in available]
        chosen = [p for p in requested if p in available]  # CPU is always the last resort
        if "CPUExecutionProvider" not in chosen:
            chosen.append("CPUExecutionProvider")
        self.session = ort_session(self.path, providers=chosen, threads=threads)
        self.providers = list(self.session.get_providers())
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_dtypes = {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32)) for i in inputs}
        try:  # the exporter's spec of the graph, where it carries one (contract.check_facts)
            self.spec = json.loads(self.session.get_modelmeta().custom_metadata_map[SPEC_KEY])
        except (KeyError, ValueError, TypeError):
            self.spec = None
        # A CPU-only session with a complete feed calls the C++ session directly, skipping the wrapper's re-check
        # of the names (C++ checks them) and its GPU-to-CPU retry: about 1 µs a call, a few % of a decode step.
        inner = getattr(self.session, "_sess", None)
        self._fast_run = inner.run if inner is not None and self.providers == ["CPUExecutionProvider"] else None

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            if self._fast_run is not None and len(feed) == len(self.input_names):
                outs = self._fast_run(self.output_names, feed, None)
            else:
                outs = self.session.run(self.output_names, feed)
        except Exception as e:
            shapes = {k: tuple(np.shape(v)) for k, v in feed.items()}
            raise ProjectableEdgeError(f"graph '{self.path.name}' failed on inputs {shapes}: {e}") from e
        return dict(zip(self.output_names, outs))
