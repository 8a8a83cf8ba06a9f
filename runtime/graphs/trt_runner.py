"""TensorRT engines behind the runner contract (TensorRT >= 8.5 name-based tensor API). tensorrt and the CUDA
runtime are loaded when a runner is built, never at import; CUDA is called through ctypes (no pycuda)."""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from pathlib import Path

import numpy as np

from ..devices.errors import ProjectableEdgeError

_H2D, _D2H = 1, 2  # cudaMemcpyKind


def _cudart() -> ctypes.CDLL:
    for n in filter(None, (ctypes.util.find_library("cudart"), "libcudart.so.12", "libcudart.so.11.0",
                           "libcudart.so.13", "libcudart.so")):
        try:
            return ctypes.CDLL(n)
        except OSError:
            pass
    raise OSError("libcudart (CUDA runtime) not found")


def _check(code: int, what: str) -> None:
    if code != 0:
        raise ProjectableEdgeError(f"CUDA call {what} failed with error {code}; check the GPU driver")


class TrtRunner:
    def __init__(self, engine_path: str | Path, name: str | None = None):
        import tensorrt as trt  # lazy: optional, heavy, device-only

        self.path = Path(engine_path)
        self.name = name or f"tensorrt:{self.path.name}"
        self.providers = [f"TensorRT {trt.__version__}"]
        self._cuda = _cudart()
        self._stream = ctypes.c_void_p()
        _check(self._cuda.cudaStreamCreate(ctypes.byref(self._stream)), "cudaStreamCreate")
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
        # one execution context, stream and set of buffers: two threads' calls (serve's workers) would mix inputs
        self._lock = threading.Lock()

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, cap = self._buffers.get(name, (0, 0))
        if nbytes > cap:
            if ptr:
                self._cuda.cudaFree(ctypes.c_void_p(ptr))
                del self._buffers[name]  # not freed again by __del__ if the larger allocation fails
            p = ctypes.c_void_p()
            _check(self._cuda.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
            ptr = p.value
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        _check(self._cuda.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes), kind,
                                          self._stream), "cudaMemcpyAsync")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            return self._run(feeds)

    def _run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for n in self.input_names:
            a = np.ascontiguousarray(feeds[n], dtype=self.input_dtypes[n])
            self.context.set_input_shape(n, a.shape)
            ptr = self._buffer(n, a.nbytes)
            if a.nbytes:
                self._copy(ptr, a.ctypes.data, a.nbytes, _H2D)
            self.context.set_tensor_address(n, ptr)
        outs = {}
        for n in self.output_names:
            outs[n] = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self.input_dtypes[n])
            self.context.set_tensor_address(n, self._buffer(n, outs[n].nbytes))
        if not self.context.execute_async_v3(self._stream.value or 0):
            raise ProjectableEdgeError(f"TensorRT engine '{self.path.name}' failed to execute; "
                                       f"inputs {[tuple(np.shape(feeds[n])) for n in self.input_names]}")
        for n, a in outs.items():
            if a.nbytes:
                self._copy(a.ctypes.data, self._buffers[n][0], a.nbytes, _D2H)
        _check(self._cuda.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return outs

    def __del__(self):
        for ptr, _ in getattr(self, "_buffers", {}).values():
            try:
                self._cuda.cudaFree(ctypes.c_void_p(ptr))
            except Exception:
                pass
