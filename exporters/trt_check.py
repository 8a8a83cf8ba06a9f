"""Static TensorRT-compatibility check of an ONNX graph on the host: what TensorRT's parser on the device would
refuse (ops it lacks, an opset it does not read, QDQ it cannot fuse), found from the graph alone, as plain data."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from projectable_edge.exporters.onnx_io import consumers, load_onnx, producers
from projectable_edge.exporters.spec import opset_of

# ONNX ops the TensorRT 10 ONNX parser (onnx-tensorrt) imports, from its operator support matrix.
TENSORRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow Hardmax HardSigmoid HardSwish
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual
Log LogSoftmax Loop LpNormalization LpPool LRN LSTM MatMul Max MaxPool Mean
MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# Opsets the parser reads, by TensorRT major.minor (the device profile records the version).
OPSET_RANGE = {"8.5": (7, 17), "8.6": (9, 17), "9": (9, 19), "10": (9, 20)}
DEFAULT_TENSORRT = "10"


def opset_range(tensorrt_version: str | None) -> tuple[int, int]:
    """A version the table lacks reads as its nearest: an older 8.x as 8.5 (no 8.x parser reads past opset 17), a
    newer major as 10."""
    parts = (tensorrt_version or DEFAULT_TENSORRT).strip().split(".")
    older = parts[0].isdigit() and int(parts[0]) <= 8
    return OPSET_RANGE.get(".".join(parts[:2])) or OPSET_RANGE.get(parts[0]) or OPSET_RANGE[
        "8.5" if older else DEFAULT_TENSORRT]


def _problem(severity: str, code: str, message: str, node: onnx.NodeProto | None = None) -> dict:
    return {"severity": severity, "code": code, "node": node.name if node is not None else None,
            "op_type": node.op_type if node is not None else None, "message": message}


def _check_qdq(model: onnx.ModelProto) -> list[dict]:
    """TensorRT's explicit quantization: symmetric int8 (zero point 0), Q always followed by DQ,
    DQ fed by Q or a constant, and both MatMul inputs dequantized for an int8 MatMul."""
    problems, prod, users = [], producers(model), consumers(model)
    consts = {i.name: i for i in model.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    for n in model.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in consts:
                problems.append(_problem("error", "qdq_dynamic_zero_point", "zero point must be a constant", n))
            else:
                zp = numpy_helper.to_array(consts[n.input[2]])
                if zp.dtype != np.int8:
                    problems.append(_problem("error", "qdq_not_int8", f"quantized type is {zp.dtype}; TensorRT needs "
                                             "int8 (use symmetric int8 activations: activation_type='int8')", n))
                if np.any(zp != 0):
                    problems.append(_problem("error", "qdq_zero_point", "zero point is not 0; TensorRT supports only "
                                             "symmetric quantization", n))
        if n.op_type == "QuantizeLinear":
            after = users.get(n.output[0], [])
            if not after or any(u.op_type != "DequantizeLinear" for u in after):
                problems.append(_problem("error", "qdq_dangling_q", "QuantizeLinear output must feed "
                                         "DequantizeLinear nodes only (a Q/DQ pair)", n))
        else:
            src = n.input[0]
            if src not in consts and (src not in prod or prod[src].op_type != "QuantizeLinear"):
                problems.append(_problem("error", "qdq_dq_without_q", "DequantizeLinear input is neither a "
                                         "QuantizeLinear output nor a constant", n))
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            fed = [i in prod and prod[i].op_type == "DequantizeLinear" for i in n.input[:2]]
            if any(fed) and not all(fed):
                problems.append(_problem("warning", "qdq_partial_matmul", "only one input is dequantized; "
                                         "TensorRT runs this MatMul in float", n))
    return problems


def check_tensorrt_compat(onnx_path_or_model, tensorrt_version: str | None = None) -> dict:
    """Check opset, op types, I/O dtypes and QDQ placement against TensorRT's ONNX parser."""
    model = onnx_path_or_model if isinstance(onnx_path_or_model, onnx.ModelProto) else load_onnx(onnx_path_or_model)
    problems: list[dict] = []
    lo, hi = opset_range(tensorrt_version)
    opset = opset_of(model)
    if not lo <= opset <= hi:
        problems.append(_problem("error", "opset", f"opset {opset} is outside the range TensorRT "
                                 f"{tensorrt_version or DEFAULT_TENSORRT} parses ({lo}..{hi}); re-export with "
                                 f"an opset in range"))
    op_types = dict(Counter(n.op_type for n in model.graph.node))
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            problems.append(_problem("error", "custom_domain", f"op {n.domain}::{n.op_type} is not standard ONNX "
                                     "(an ONNX Runtime contrib op?); TensorRT needs a plugin for it", n))
        elif n.op_type not in TENSORRT_SUPPORTED_OPS:
            problems.append(_problem("error", "unsupported_op", f"{n.op_type} is not supported by TensorRT's ONNX "
                                     "parser", n))
    for vi in [*model.graph.input, *model.graph.output]:
        et = vi.type.tensor_type.elem_type
        if et == onnx.TensorProto.INT64:
            problems.append(_problem("warning", "int64_io", f"'{vi.name}' is int64: TensorRT before 10 casts it "
                                     "to int32, TensorRT 10 keeps int64 bindings; feed int64 ids (values < 2^31)"))
        elif et == onnx.TensorProto.DOUBLE:
            problems.append(_problem("warning", "double_io", f"'{vi.name}' is float64: TensorRT casts it to float32"))
        dims = vi.type.tensor_type.shape.dim
        if any(d.HasField("dim_param") or not d.HasField("dim_value") for d in dims) and vi in model.graph.input:
            problems.append(_problem("info", "dynamic_input", f"'{vi.name}' has dynamic axes; the engine needs an "
                                     "optimization profile (min/opt/max shapes)"))
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.DOUBLE:
            problems.append(_problem("warning", "double_weight", f"initializer '{init.name}' is float64; TensorRT "
                                     "casts it to float32"))
    problems.extend(_check_qdq(model))  # nothing to find in a graph without Q/DQ
    counts = {s: sum(p["severity"] == s for p in problems) for s in ("error", "warning", "info")}
    return {"ok": counts["error"] == 0, "tensorrt_version": tensorrt_version or DEFAULT_TENSORRT, "opset": opset,
            "opset_range": [lo, hi], "problems": problems, "counts": counts, "op_types": op_types,
            "quantized": any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)}
