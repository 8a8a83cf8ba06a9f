"""Compile a graph for a named target: dispatch on the device profile's compile backend."""

from __future__ import annotations

from pathlib import Path

from projectable_edge.exporters.ort_compile import OrtCompileSettings, compile_onnxruntime
from projectable_edge.exporters.tensorrt import TensorRTSettings, compile_tensorrt
from projectable_edge_runtime.devices.choices import CompileBackend, choose
from projectable_edge_runtime.devices.profiles import load_profile


def compile_for_target(onnx_path: str | Path, target, out_dir: str | Path, *, overwrite: bool = False,
                       log=None, copy_onnx: bool = True) -> tuple[Path, dict]:
    """target: a profile name/alias/path or a DeviceProfile. Returns (artifact, report).
    copy_onnx=False: a TensorRT build script reads the graph where it is (a bundle ships it once)."""
    profile = load_profile(target) if isinstance(target, (str, Path)) else target
    backend = choose(CompileBackend, profile.compile_backend, f"compile backend of profile {profile.name!r}")
    if backend is CompileBackend.TENSORRT:
        return compile_tensorrt(onnx_path, TensorRTSettings.from_profile(profile), out_dir, overwrite=overwrite,
                                log=log, copy_onnx=copy_onnx)
    return compile_onnxruntime(onnx_path, OrtCompileSettings.from_profile(profile), out_dir, overwrite=overwrite,
                               log=log)
