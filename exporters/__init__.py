"""Host side (torch, onnx): ONNX export with its parity check, quantization (one converter per registry
variant) and compilation for a target (TensorRT or ONNX Runtime). Import the module you need."""
