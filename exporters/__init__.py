"""ONNX export + parity check, quantization, and compilation for targets (host side: torch, onnx).

One job per module; each step is `(input, settings, out_dir) -> (artifact, JSON-ready report)`:
  protocol     ExportableModel          what a model must offer to be exported (projectable_edge implements it)
  onnx_export  export_onnx              model -> scoring.onnx + decode.onnx (parity-checked)
  parity       check_parity             ONNX Runtime vs PyTorch through one runner contract, bits/dim
  quantize     quantize                 a registry variant (fp16, int8-static, ...) of the fp32 graph, validated
  converters   CONVERTERS               one converter per registry variant
  compile      compile_for_target       tensorrt.compile_tensorrt | ort_compile.compile_onnxruntime by profile
  trt_check    check_tensorrt_compat    static TensorRT compatibility of a graph
Import the module you need; nothing is re-exported here.
"""
