"""The torch-free runtime an app embeds: numpy + onnxruntime only (tensorrt optional, lazy).

    import projectable_edge_runtime as runtime
    model = runtime.load("bundles/3__jetson-orin-nano")  # verifies every file's sha256 first
    bits = model.score(images)                           # bits/dim per image
    tokens = model.sample(16, seed=0); images = model.decode_images(tokens)
    runtime.validate(model); runtime.benchmark(model)

onnxruntime is imported on first use of `load`, so `import projectable_edge_runtime.tokenizer` stays light.
`validate` and `benchmark` are bound eagerly: they share their submodules' names, and an
eager binding is what keeps `runtime.validate` the function after importing the `validate` submodule.

The folder runtime/ is installed as the package `projectable_edge_runtime` (devices/ as its
`devices` subpackage), by the project's editable install or by the wheel inside every bundle.
"""
if __name__ == "runtime":  # `python -m runtime` / `import runtime` from the repository root
    raise ImportError("the runtime's import name is projectable_edge_runtime (`pip install -e .` here, or a "
                      "bundle's runtime/*.whl on a device): use `python -m projectable_edge_runtime ...`")

from .devices.errors import ProjectableEdgeError
from .benchmark import benchmark
from .validate import validate

__all__ = ["ProjectableEdgeError", "load", "Model", "validate", "benchmark", "write_manifest",
           "read_manifest", "staged_bundle", "SCHEMA_VERSION"]

_LAZY = {"load": ".bundle", "Model": ".bundle", "write_manifest": ".manifest",
         "read_manifest": ".manifest", "staged_bundle": ".manifest",
         "SCHEMA_VERSION": ".manifest"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
