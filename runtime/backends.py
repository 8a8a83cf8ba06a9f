"""Inference backends behind one runner interface (Polygraphy-style).

A runner has `name`, `providers` (what actually executes), `input_names`, `output_names`,
`input_dtypes` and `run(feeds) -> {output name: array}`. `OrtRunner` wraps an
onnxruntime session; `TrtRunner` a deserialized TensorRT engine (tensorrt and the CUDA
runtime are loaded lazily, so hosts without them never pay for it). `make_runners` picks
one and says why, so a silent CPU fallback never passes for a TensorRT run.
"""
from __future__ import annotations

import os

import ctypes
import ctypes.util
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from devices.errors import ProjectableEdgeError

SCORE_IO = (("tokens",), ("logits",))
DECODE_IO = (("token", "past_keys", "past_values"), ("logits", "present_keys", "present_values"))
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


def resolve_providers(requested: list[str] | tuple[str, ...] | None) -> tuple[list[str], list[str]]:
    """(usable providers in the requested order, requested-but-missing); CPU is always last resort."""
    available = ort.get_available_providers()
    requested = list(requested or ["CPUExecutionProvider"])
    chosen = [p for p in requested if p in available]
    missing = [p for p in requested if p not in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen, missing


class OrtRunner:
    """One onnxruntime.InferenceSession; `providers` is what the session really uses."""

    def __init__(self, path: str | Path, providers=None, threads: int = 0, name: str | None = None):
        self.path = Path(path)
        self.name = name or f"onnxruntime:{self.path.name}"
        chosen, self.missing_providers = resolve_providers(providers)
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only; the report says which providers ran
        # idle ORT threads sleep instead of busy-waiting, so they do not starve other processes on small CPUs
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads > 0:
            so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=so, providers=chosen)
        except Exception as e:  # ORT raises its own pybind types (InvalidGraph, Fail, ...)
            raise ProjectableEdgeError(f"onnxruntime cannot load graph '{self.path}': {e}; the file "
                                       "may be corrupt or need a newer onnxruntime") from e
        self.providers = list(self.session.get_providers())
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.input_dtypes = {i.name: np.dtype(_ORT_TYPES.get(i.type, np.float32))
                             for i in self.session.get_inputs()}
        self.input_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = self.session.run(self.output_names, feeds)
        except Exception as e:
            shapes = {k: tuple(np.shape(v)) for k, v in feeds.items()}
            raise ProjectableEdgeError(f"graph '{self.path.name}' failed on inputs {shapes}: {e}") from e
        return dict(zip(self.output_names, outs))


class _CudaRuntime:
    """The few libcudart calls TensorRT needs, via ctypes (no pycuda/cuda-python dependency)."""

    H2D, D2H = 1, 2

    def __init__(self):
        names = [ctypes.util.find_library("cudart")] + [f"libcudart.so.{v}" for v in ("12", "11.0", "13")]
        names += ["libcudart.so"]
        self.lib = None
        for n in filter(None, names):
            try:
                self.lib = ctypes.CDLL(n)
                break
            except OSError:
                continue
        if self.lib is None:
            raise OSError("libcudart (CUDA runtime) not found")
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise ProjectableEdgeError(f"CUDA call {what} failed with error {code}; check the GPU driver")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return ptr.value

    def free(self, ptr: int) -> None:
        self.lib.cudaFree(ctypes.c_void_p(ptr))

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src),
                                             ctypes.c_size_t(nbytes), kind, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")


class TrtRunner:
    """A serialized TensorRT engine (TensorRT >= 8.5 name-based tensor API)."""

    def __init__(self, engine_path: str | Path, name: str | None = None):
        import tensorrt as trt  # lazy: optional, heavy, device-only

        self.path = Path(engine_path)
        self.name = name or f"tensorrt:{self.path.name}"
        self.providers = [f"TensorRT {trt.__version__}"]
        self._trt = trt
        self._cuda = _CudaRuntime()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ProjectableEdgeError(f"TensorRT {trt.__version__} cannot deserialize engine '{self.path}'; "
                                       "it was built by another TensorRT version or GPU — rebuild it on this "
                                       "device with the bundle's build_engine.sh")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_in[n]]
        self.output_names = [n for n in names if not is_in[n]]
        self.input_dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, capacity bytes)

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                self._cuda.free(ptr)
            ptr, cap = self._cuda.malloc(nbytes), nbytes
            self._buffers[name] = (ptr, cap)
        return ptr

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda = self._cuda
        for n in self.input_names:
            a = np.ascontiguousarray(feeds[n], dtype=self.input_dtypes[n])
            self.context.set_input_shape(n, a.shape)
            ptr = self._buffer(n, a.nbytes)
            if a.nbytes:
                cuda.copy(ptr, a.ctypes.data, a.nbytes, cuda.H2D)
            self.context.set_tensor_address(n, ptr)
        outs = {}
        for n in self.output_names:
            shape = tuple(self.context.get_tensor_shape(n))
            outs[n] = np.empty(shape, dtype=self.input_dtypes[n])
            self.context.set_tensor_address(n, self._buffer(n, outs[n].nbytes))
        if not self.context.execute_async_v3(cuda.stream.value or 0):
            raise ProjectableEdgeError(f"TensorRT engine '{self.path.name}' failed to execute; "
                                       f"inputs {[tuple(np.shape(feeds[n])) for n in self.input_names]}")
        for n, a in outs.items():
            if a.nbytes:
                cuda.copy(a.ctypes.data, self._buffers[n][0], a.nbytes, cuda.D2H)
        cuda.sync()
        return outs

    def __del__(self):
        for ptr, _ in getattr(self, "_buffers", {}).values():
            try:
                self._cuda.free(ptr)
            except Exception:
                pass


def check_io(runner, expected: tuple[tuple[str, ...], tuple[str, ...]], what: str) -> None:
    """A graph that does not speak the bundle's I/O contract fails at load, not mid-sampling."""
    ins, outs = expected
    missing = [n for n in ins if n not in runner.input_names] + [n for n in outs if n not in runner.output_names]
    if missing:
        raise ProjectableEdgeError(f"{what} graph '{runner.name}' lacks tensor(s) {missing} (has inputs "
                                   f"{runner.input_names}, outputs {runner.output_names}); regenerate the bundle")


def _tensorrt_version() -> tuple[str | None, str]:
    try:
        import tensorrt as trt  # lazy
    except Exception as e:  # ImportError, or a broken install raising OSError
        return None, f"tensorrt is not importable here ({type(e).__name__}: {e})"
    return str(trt.__version__), ""


def _major_minor(v: str) -> str:
    return ".".join(str(v).split(".")[:2])


def choose_engine(bundle_dir: Path, engine: dict[str, Any], variant: str, backend: str) -> tuple[Path | None, str]:
    """(engine path to use or None, why). Never raises for a missing TensorRT: ORT is the fallback."""
    status = engine.get("status")
    if backend == "onnxruntime":
        return None, "onnxruntime backend requested"
    if status == "not-applicable":
        return None, "the target compiles with onnxruntime; the bundle has no TensorRT engine"
    if engine.get("variant") and engine["variant"] != variant:
        return None, (f"the TensorRT engine was built from variant '{engine['variant']}', "
                      f"but variant '{variant}' was requested")
    path = bundle_dir / engine["path"] if engine.get("path") else None
    if path is None or not path.is_file():
        cmd = engine.get("command") or "bash build_engine.sh"
        return None, f"TensorRT engine not built yet ({status}); build it on the device with `{cmd}`"
    version, why = _tensorrt_version()
    if version is None:
        return None, why
    built = engine.get("tensorrt_version")
    if built and _major_minor(built) != _major_minor(version):
        return None, (f"the engine was built with TensorRT {built} but this device has {version}; engines "
                      "are locked to the TensorRT version — rebuild with the bundle's build_engine.sh")
    return path, f"TensorRT {version} engine '{engine['path']}'"


def make_runners(bundle_dir: Path, manifest: dict[str, Any], variant: str, profile,
                 providers=None, backend: str = "auto", threads: int | None = None):
    """(score runner, decode runner or None, report dict) for one graph variant."""
    if backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ProjectableEdgeError(f"unknown backend {backend!r}; use auto, onnxruntime or tensorrt")
    graphs = manifest["graphs"][variant]
    engine = manifest["engine"]
    requested = list(providers) if providers else list(profile.execution_providers)
    if threads is None:
        # the profile's count is the device's; never ask for more threads than this machine has cores
        threads = min(int(profile.threads), os.cpu_count() or 1) if profile.threads else 0
    threads = int(threads)
    if threads < 0:
        raise ProjectableEdgeError(f"threads must be >= 0 (0 = onnxruntime default), got {threads}")
    engine_path, reason = choose_engine(bundle_dir, engine, variant, backend)
    score = decode = None
    if engine_path is not None:
        try:
            score = TrtRunner(engine_path, name=f"tensorrt:{engine['path']}")
            if engine.get("decode_path") and (bundle_dir / engine["decode_path"]).is_file():
                decode = TrtRunner(bundle_dir / engine["decode_path"], name=f"tensorrt:{engine['decode_path']}")
        except Exception as e:  # CUDA missing, engine for another GPU, ...
            score = decode = None
            reason = f"TensorRT engine could not be used ({e})"
    if backend == "tensorrt" and score is None:
        raise ProjectableEdgeError(f"TensorRT backend requested but unusable: {reason}")
    if score is None:
        score = OrtRunner(bundle_dir / graphs["score"], requested, threads, name=f"onnxruntime:{graphs['score']}")
    check_io(score, SCORE_IO, "score")
    if decode is None and graphs.get("decode"):
        decode = OrtRunner(bundle_dir / graphs["decode"], requested, threads, name=f"onnxruntime:{graphs['decode']}")
    if decode is not None:
        check_io(decode, DECODE_IO, "decode")
    missing = sorted({p for r in (score, decode) if isinstance(r, OrtRunner) for p in r.missing_providers})
    report = {
        "backend": "tensorrt" if isinstance(score, TrtRunner) else "onnxruntime",
        "reason": reason,
        "score_runner": score.name,
        "decode_runner": decode.name if decode is not None else None,
        "providers_requested": requested,
        "providers_available": list(ort.get_available_providers()),
        "providers_missing": missing,
        "providers": list(score.providers),
        "decode_providers": list(decode.providers) if decode is not None else [],
        "onnxruntime_version": ort.__version__,
        "threads": threads,
    }
    return score, decode, report
