"""What this machine offers the runtime: execution providers, a visible GPU, TensorRT, emulation.

ONNX Runtime from PyPI is CPU-only on a Jetson, and a plain venv cannot see JetPack's apt-installed
`tensorrt`, so without this report a bundle silently runs on the CPU. `execution_report` says which
providers exist, which were asked for, which ran, and, when a GPU is visible but only the CPU
provider is installed, the fix (`gpu_hint`). Stdlib only; nothing heavy is imported.
"""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
from pathlib import Path

# Providers that do not compute on this machine (PyPI's onnxruntime >= 1.19 lists Azure everywhere).
NON_COMPUTE = frozenset({"AzureExecutionProvider"})
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                 "MIGraphXExecutionProvider")
_X86_VENDORS = ("GenuineIntel", "AuthenticAMD")

JETSON_GPU_FIX = (
    "a GPU is visible but this onnxruntime has only the CPU provider: on a Jetson (JetPack 6), create the "
    "venv with `python3 -m venv --system-site-packages pe` (JetPack's apt tensorrt becomes importable), "
    "install NVIDIA's onnxruntime-gpu wheel built for your JetPack (the Jetson AI Lab pip index or the "
    "Jetson Zoo; PyPI's onnxruntime is CPU-only on a Jetson), then "
    "`pe/bin/pip install --no-deps BUNDLE/runtime/*.whl` so pip does not add the CPU onnxruntime again")
OTHER_GPU_FIX = ("a GPU is visible but this onnxruntime has only the CPU provider: install onnxruntime-gpu "
                 "(and uninstall onnxruntime), then `pip install --no-deps BUNDLE/runtime/*.whl`")


def compute_providers(providers) -> list[str]:
    return [p for p in providers if p not in NON_COMPUTE]


def _read(path: str) -> str:
    try:
        return Path(path).read_bytes().decode("utf-8", "replace").replace("\0", " ").strip()
    except OSError:
        return ""


def jetson_model() -> str | None:
    """'NVIDIA Jetson Orin Nano ...' on a Jetson (device tree or L4T release file), else None."""
    model = _read("/proc/device-tree/model")
    if "jetson" in model.lower():
        return model
    if os.path.exists("/etc/nv_tegra_release"):
        return model or "NVIDIA Jetson (L4T)"
    return None


def gpu_visible() -> str | None:
    """A short description of a visible NVIDIA GPU, or None."""
    j = jetson_model()
    if j:
        return j
    if os.path.exists("/dev/nvidia0"):
        return "NVIDIA GPU (/dev/nvidia0)"
    if ctypes.util.find_library("cuda"):
        return "CUDA driver library present"
    return None


def emulated() -> bool:
    """True under user-mode emulation (qemu): an ARM machine() on a CPU whose vendor is Intel/AMD."""
    if platform.machine().lower() not in ("aarch64", "arm64", "armv7l", "armv8l"):
        return False
    cpuinfo = _read("/proc/cpuinfo")
    return any(v in cpuinfo for v in _X86_VENDORS)


def tensorrt_importable() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):
        return False


def gpu_hint(available, gpu: str | None) -> str | None:
    """The fix when a GPU is visible and only CPU providers are installed; else None."""
    if not gpu or any(p in GPU_PROVIDERS for p in available):
        return None
    return JETSON_GPU_FIX if "jetson" in gpu.lower() or "L4T" in gpu else OTHER_GPU_FIX


def execution_report(available, requested, used: dict[str, list[str]]) -> dict:
    """{available, requested, used (per graph), missing, gpu_visible, tensorrt_importable, emulated, hint}."""
    available = compute_providers(available)
    gpu = gpu_visible()
    return {"available": available, "requested": list(requested), "used": used,
            "missing": [p for p in requested if p not in available], "gpu_visible": gpu,
            "tensorrt_importable": tensorrt_importable(), "emulated": emulated(),
            "gpu_hint": gpu_hint(available, gpu)}
