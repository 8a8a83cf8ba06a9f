"""TensorRT engines behind the runner contract (TensorRT >= 8.5 name-based tensor API). tensorrt and the CUDA
runtime are loaded when a runner is built, never at import; the CUDA calls go through ctypes (no pycuda).
"""
from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import numpy as np

from ..devices.errors import ProjectableEdgeError


class _CudaRuntime:
    """The few libcudart calls TensorRT needs, via ctypes (no pycuda/cuda-python dependency)."""

    H2D, D2H = 1, 2

    def __init__(self):
        self.lib = None
        for n in filter(None, (ctypes.util.find_library("cudart"), "libcudart.so.12", "libcudart.so.11.0",
                               "libcudart.so.13", "libcudart.so")):
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
