"""Compile a graph for a named target: dispatch on the device profile's compile backend."""

from __future__ import annotations

from pathlib import Path

from devices.errors import ProjectableEdgeError


def _profile(target):
    if isinstance(target, (str, Path)):
        from devices.profiles import load_profile

        return load_profile(target)
    return target


def compile_for_target(onnx_path: str | Path, target, out_dir: str | Path, *, overwrite: bool = False,
                       log=None) -> tuple[Path, dict]:
    """target: a profile name/alias/path, a DeviceProfile, or its to_dict(). Returns (artifact, report)."""
    profile = _profile(target)
    d = profile.to_dict() if hasattr(profile, "to_dict") else dict(profile)
    backend = d.get("compile_backend")
    if backend == "tensorrt":
        from exporters.tensorrt import TensorRTSettings, compile_tensorrt

        return compile_tensorrt(onnx_path, TensorRTSettings.from_profile(d), out_dir, overwrite=overwrite, log=log)
    if backend == "onnxruntime":
        from exporters.ort_compile import OrtCompileSettings, compile_onnxruntime

        return compile_onnxruntime(onnx_path, OrtCompileSettings.from_profile(d), out_dir, overwrite=overwrite,
                                   log=log)
    raise ProjectableEdgeError(f"device profile {d.get('name')!r} has compile backend {backend!r}; "
                               "expected 'tensorrt' or 'onnxruntime'")
