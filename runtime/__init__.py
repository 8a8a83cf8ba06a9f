"""The torch-free runtime an app embeds: numpy + onnxruntime only (tensorrt optional, lazy).

    import projectable_edge_runtime as runtime
    model = runtime.load("bundles/3__jetson-orin-nano")  # verifies every file's sha256 first
    bits = model.score(images)                           # bits/dim per image
    tokens = model.sample(16, seed=0); images = model.decode_images(tokens)
    runtime.validate(model); runtime.benchmark(model)

`load` and the manifest's names are imported on first use: onnxruntime only loads when a bundle does.
"""
if __name__ == "runtime":  # `python -m runtime` / `import runtime` from the repository root
    raise ImportError("the runtime's import name is projectable_edge_runtime (`pip install -e .` here, or a "
                      "bundle's runtime/*.whl on a device): use `python -m projectable_edge_runtime ...`")

import importlib

from .devices.errors import ProjectableEdgeError
from .commands.benchmark import benchmark
from .commands.validate import validate

__all__ = ["ProjectableEdgeError", "load", "Model", "validate", "benchmark", "write_manifest",
           "read_manifest", "staged_bundle", "SCHEMA_VERSION"]

_LAZY = {"load": ".bundle.load", "Model": ".bundle.load", "write_manifest": ".bundle.manifest",
         "read_manifest": ".bundle.manifest", "staged_bundle": ".bundle.manifest",
         "SCHEMA_VERSION": ".bundle.manifest"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
