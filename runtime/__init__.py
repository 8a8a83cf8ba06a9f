"""The torch-free runtime an app embeds (numpy + onnxruntime; tensorrt optional): the README's Python API shows it.
`load` and the manifest's names are imported on first use: onnxruntime only loads when a bundle does."""
if __name__ == "runtime":  # `python -m runtime` / `import runtime` from the repository root
    raise ImportError("the runtime's import name is projectable_edge_runtime (`pip install -e .` here, or a "
                      "bundle's runtime/*.whl on a device): use `python -m projectable_edge_runtime ...`")

import importlib
import os

# recent official onnxruntime builds send usage telemetry on Linux and macOS too; an app on a user's device should
# not unless its author chooses to: off unless the environment already says (ORT_DISABLE_TELEMETRY=0 allows it)
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from .devices.errors import ProjectableEdgeError
from .commands.benchmark import benchmark
from .commands.validate import validate

_LAZY = {"load": ".bundle.load", "Model": ".bundle.load", **dict.fromkeys(
    ("write_manifest", "read_manifest", "staged_bundle", "SCHEMA_VERSION"), ".bundle.manifest"),
    "TunedRecordWarning": ".commands.tune"}  # so an app can filter it: warnings.simplefilter("ignore", ...)
__all__ = ["ProjectableEdgeError", "validate", "benchmark", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *_LAZY})
