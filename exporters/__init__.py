"""ONNX export + parity check, quantization, and compilation for targets.

One job per module, each step `(input, settings, out_dir) -> (artifact, report)` with a
JSON-ready report for the bundle manifest:
  onnx_export  export_onnx        SpecialisedModel -> scoring.onnx + decode.onnx (parity-checked)
  parity       check_parity       ONNX Runtime vs PyTorch, per-output tolerances, bits/dim
  quantize     quantize.quantize  fp16 / int8-dynamic / int8-static (QDQ) variants, validated
  compile      compile_for_target dispatch on the profile: tensorrt.compile_tensorrt | ort_compile.compile_onnxruntime
  trt_check    check_tensorrt_compat  static TensorRT compatibility of a graph
  sampling     sample_decode / sample_recompute  minimal numpy sampler over the graphs
Names are imported lazily so `import exporters` stays cheap (torch, onnxruntime load on use).
"""

from importlib import import_module

_API = {
    "ExportSettings": "onnx_export", "ExportedGraphs": "onnx_export", "export_onnx": "onnx_export",
    "ExportSpec": "spec", "TensorSpec": "spec", "read_spec": "spec",
    "Tolerance": "parity", "check_parity": "parity", "bits_per_dim_onnx": "parity", "bits_per_dim_torch": "parity",
    "QuantizeSettings": "quantize",  # the function is exporters.quantize.quantize (same name as its module)
    "TensorRTSettings": "tensorrt", "compile_tensorrt": "tensorrt",
    "OrtCompileSettings": "ort_compile", "compile_onnxruntime": "ort_compile",
    "compile_for_target": "compile", "check_tensorrt_compat": "trt_check",
    "sample_decode": "sampling", "sample_recompute": "sampling",
    "atomic_dir": "atomic", "atomic_file": "atomic",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(f"exporters.{_API[name]}"), name)
    raise AttributeError(f"module 'exporters' has no attribute {name!r}")
