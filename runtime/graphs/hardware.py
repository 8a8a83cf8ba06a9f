"""What this machine offers the runtime (providers, a visible GPU, TensorRT, emulation), stdlib only: PyPI's
onnxruntime is CPU-only on a Jetson and a plain venv cannot see JetPack's `tensorrt`, so without this report a
bundle silently runs on the CPU."""
from __future__ import annotations

import ctypes.util
import importlib.util
import os
import platform
from pathlib import Path

NON_COMPUTE = frozenset({"AzureExecutionProvider"})  # listed everywhere by PyPI's onnxruntime >= 1.19
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider",
                 "MIGraphXExecutionProvider")

JETSON_GPU_FIX = (
    "a GPU is visible but this onnxruntime has only the CPU provider: on a Jetson (JetPack 6), create the "
    "venv with `python3 -m venv --system-site-packages pe` (JetPack's apt tensorrt becomes importable), "
    "install NVIDIA's onnxruntime-gpu wheel built for your JetPack (the Jetson AI Lab pip index or the "
    "Jetson Zoo; PyPI's onnxruntime is CPU-only on a Jetson), then "
    "`pe/bin/pip install --no-deps BUNDLE/runtime/*.whl` so pip does not add the CPU onnxruntime again")
OTHER_GPU_FIX = ("a GPU is visible but this onnxruntime has only the CPU provider: install onnxruntime-gpu "
                 "(and uninstall onnxruntime), then `pip install --no-deps BUNDLE/runtime/*.whl`")


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
    return (model or "NVIDIA Jetson (L4T)") if os.path.exists("/etc/nv_tegra_release") else None


def gpu_visible() -> str | None:
    if model := jetson_model():
        return model
    if os.path.exists("/dev/nvidia0"):
        return "NVIDIA GPU (/dev/nvidia0)"
    return "CUDA driver library present" if ctypes.util.find_library("cuda") else None


def emulated() -> bool:
    """True under user-mode emulation (qemu): an ARM machine() on a CPU whose vendor is Intel/AMD."""
    if platform.machine().lower() not in ("aarch64", "arm64", "armv7l", "armv8l"):
        return False
    return any(v in _read("/proc/cpuinfo") for v in ("GenuineIntel", "AuthenticAMD"))


def tensorrt_version() -> tuple[str | None, str]:
    """(tensorrt.__version__, "") when it imports here, else (None, why)."""
    try:
        import tensorrt as trt  # lazy: device only
    except Exception as e:  # ImportError, or a broken install raising OSError
        return None, f"tensorrt is not importable here ({type(e).__name__}: {e})"
    return str(trt.__version__), ""


def tensorrt_importable() -> bool:
    try:
        return importlib.util.find_spec("tensorrt") is not None
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        return False


def gpu_hint(available, gpu: str | None) -> str | None:
    """The fix when a GPU is visible and only CPU providers are installed; else None."""
    if not gpu or any(p in GPU_PROVIDERS for p in available):
        return None
    return JETSON_GPU_FIX if "jetson" in gpu.lower() or "L4T" in gpu else OTHER_GPU_FIX


def execution_report(available, requested, used: dict[str, list[str]]) -> dict:
    available = [p for p in available if p not in NON_COMPUTE]
    gpu = gpu_visible()
    return {"available": available, "requested": list(requested), "used": used,
            "missing": [p for p in requested if p not in available], "gpu_visible": gpu,
            "tensorrt_importable": tensorrt_importable(), "emulated": emulated(),
            "gpu_hint": gpu_hint(available, gpu)}
