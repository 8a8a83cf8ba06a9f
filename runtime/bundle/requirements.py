"""What a bundle needs of the machine that runs it (the manifest's `requires`), checked by `load` before any session.

MIN_ONNXRUNTIME was measured: onnxruntime 1.17 cannot read the graphs' ONNX IR 10, 1.18 has no Trilu kernel for
their bool causal mask, and PyPI's builds before 1.19 do not import with numpy 2. pyproject.toml declares the same
floors (a test keeps them equal).
"""
from __future__ import annotations

import re
import sys
from importlib import metadata

from ..devices.errors import ProjectableEdgeError

MIN_ONNXRUNTIME = "1.19.0"
MIN_NUMPY = "1.24"
MIN_PYTHON = "3.10"
WHY_ONNXRUNTIME = "ONNX IR 10 graphs with Trilu on bool tensors"


def parse_version(text: str) -> tuple[int, ...]:
    """'1.19.2' -> (1, 19, 2); local/dev/rc suffixes ('1.20.0+cu118', '1.21.0.dev2024', '1.18.0rc1') are dropped."""
    m = re.match(r"\d+(\.\d+)*", str(text).strip())
    return tuple(int(x) for x in m.group().split(".")) if m else (0,)


def requires_for(ir_version: int | None = None, opsets: dict[str, int] | None = None):
    """The manifest's `requires` for graphs of this IR version / opset imports."""
    from .manifest import Requires

    opsets = {k: int(v) for k, v in sorted((opsets or {}).items())}
    return Requires(f">={MIN_PYTHON}", f">={MIN_ONNXRUNTIME}", f">={MIN_NUMPY}", WHY_ONNXRUNTIME,
                    None if ir_version is None else int(ir_version), opsets)


def installed_onnxruntime_version() -> str:
    import onnxruntime as ort  # only called once onnxruntime imported fine
    return str(getattr(ort, "__version__", "0"))


def _dist_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def import_onnxruntime():
    """`import onnxruntime`, or one error naming the installed onnxruntime/numpy and the fix."""
    try:
        import onnxruntime
    except ImportError as e:
        ort_v = _dist_version("onnxruntime") or _dist_version("onnxruntime-gpu")
        if ort_v is None:
            raise ProjectableEdgeError(f"onnxruntime is not installed; pip install 'onnxruntime>={MIN_ONNXRUNTIME}' "
                                       "(or NVIDIA's onnxruntime-gpu build on a Jetson)") from None
        hint = ""
        if parse_version(ort_v) < parse_version(MIN_ONNXRUNTIME):
            hint = (f"; onnxruntime {ort_v} is below this runtime's minimum {MIN_ONNXRUNTIME} "
                    f"(builds before 1.19 need numpy<2)")
        raise ProjectableEdgeError(f"onnxruntime {ort_v} does not import with numpy {_dist_version('numpy')} "
                                   f"({type(e).__name__}: {str(e).strip() or 'no message'}){hint}: "
                                   f"pip install 'onnxruntime>={MIN_ONNXRUNTIME}' 'numpy>={MIN_NUMPY}'") from None
    return onnxruntime


def check_requirements(bundle_dir, requires, ort_version: str | None = None) -> None:
    """Raise one clear error when this machine is below what the bundle declares (`Requires`) or the minimum."""
    specs = (str(requires.onnxruntime).strip(), str(requires.python).strip())
    if bad := [s for s in specs if not s.startswith(">=")]:  # the only form `generate` writes
        raise ProjectableEdgeError(f"bundle {bundle_dir}: manifest field 'requires' has {bad[0]!r}; "
                                   "expected '>=X.Y.Z'")
    need_ort, need_py = (s[2:].strip() for s in specs)
    need_ort = max(need_ort, MIN_ONNXRUNTIME, key=parse_version)  # this runtime's graphs never run below it
    if sys.version_info[:3] < parse_version(need_py):
        raise ProjectableEdgeError(f"bundle {bundle_dir} needs Python >= {need_py}; this is "
                                   f"{sys.version.split()[0]}: use a newer python3 for the runtime's venv")
    have = ort_version if ort_version is not None else installed_onnxruntime_version()
    if parse_version(have) < parse_version(need_ort):
        raise ProjectableEdgeError(f"bundle {bundle_dir} needs onnxruntime >= {need_ort} ({requires.onnxruntime_reason}); "
                                   f"installed: onnxruntime {have}. Upgrade: pip install 'onnxruntime>={need_ort}' "
                                   "(on a Jetson, NVIDIA's onnxruntime-gpu of that version or newer)")
