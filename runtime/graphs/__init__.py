"""Running a bundle's graphs: the graph contract (kinds, I/O, cache layout, rollout), the runners (ONNX
Runtime, TensorRT) and which one runs, the one sampler, scoring, and the tokenizer (images <-> tokens)."""
