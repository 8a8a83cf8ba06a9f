"""The torch-free runtime an app embeds: numpy + onnxruntime only (tensorrt optional, lazy).

    import runtime
    model = runtime.load("bundles/3__jetson-orin-nano")  # verifies every file's sha256 first
    bits = model.score(images)                           # bits/dim per image
    tokens = model.sample(16, seed=0); images = model.decode_images(tokens)
    runtime.validate(model); runtime.benchmark(model)

onnxruntime is imported on first use of `load`, so `import runtime.tokenizer` stays light.
`validate` and `benchmark` are bound eagerly: they share their submodules' names, and an
eager binding is what keeps `runtime.validate` the function after `import runtime.validate`.
"""
from devices.errors import ProjectableEdgeError
from runtime.benchmark import benchmark
from runtime.validate import validate

__all__ = ["ProjectableEdgeError", "load", "Model", "validate", "benchmark", "write_manifest",
           "read_manifest", "staged_bundle", "SCHEMA_VERSION"]

_LAZY = {"load": "runtime.bundle", "Model": "runtime.bundle", "write_manifest": "runtime.manifest",
         "read_manifest": "runtime.manifest", "staged_bundle": "runtime.manifest",
         "SCHEMA_VERSION": "runtime.manifest"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
