"""One converter per graph variant, under the variant registry's `converter` key (devices/variants.py): a
`Conversion` in, (converted ModelProto, report extras) out; exporters.quantize validates every result alike."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from projectable_edge.exporters.onnx_io import quiet
from projectable_edge.exporters.parity import graph_bits
from projectable_edge_runtime.graphs.contract import GraphKind, rollout
from projectable_edge_runtime.graphs.runners import OrtRunner

# Ops whose fp16 evaluation can overflow or lose mass (variance, exp, sums); candidates to keep fp32.
FP16_SENSITIVE_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Log")


@dataclass(frozen=True)
class Conversion:
    src: Path  # the fp32 graph file
    proto: onnx.ModelProto
    spec: Any  # exporters.spec.ExportSpec
    settings: Any  # exporters.quantize.QuantizeSettings
    calibration: np.ndarray | None
    validation: np.ndarray
    exclude: list[str]  # node names left in float
    workdir: Path | None = None  # an empty folder for intermediate files (set by `convert`)


def _terminal_outputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy where no graph output is also read inside the graph: such an output (a 1-layer decode graph's
    present_keys, read by its attention) gets an Identity, since keep_io_types casts the output name back to
    fp32 and its inner readers would then see fp32."""
    outputs = {o.name for o in model.graph.output}
    read = {i for n in model.graph.node for i in n.input} & outputs
    if not read:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for n in model.graph.node:
        n.output[:] = [f"{o}_inner" if o in read else o for o in n.output]
        n.input[:] = [f"{i}_inner" if i in read else i for i in n.input]
    model.graph.node.extend(onnx.helper.make_node("Identity", [f"{o}_inner"], [o], name=f"{o}_identity")
                            for o in sorted(read))
    return model


def to_fp16(model: onnx.ModelProto, keep: tuple[str, ...]) -> onnx.ModelProto:
    from onnxconverter_common import float16

    with quiet():
        return float16.convert_float_to_float16(_terminal_outputs(model), keep_io_types=True,
                                                op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep))


class ReferenceRunner:
    """onnx.reference (numpy, every op in its declared dtype) behind the runner contract."""

    def __init__(self, model: onnx.ModelProto):
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(model)
        self.name, self.providers = "onnx.reference", ["numpy"]
        self.input_names = [i.name for i in model.graph.input]
        self.output_names = [o.name for o in model.graph.output]
        self.input_dtypes = {n: np.dtype(np.int64 if n.startswith("token") else np.float32) for n in self.input_names}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.evaluator.run(None, feed)))


def fp16(job: Conversion) -> tuple[onnx.ModelProto, dict]:
    """Which sensitive ops stay fp32 is measured, not assumed: each candidate runs under true fp16
    arithmetic (onnx.reference) because ONNX Runtime's CPU provider computes most fp16 ops in fp32."""
    if job.settings.fp16_keep_fp32 is not None:
        keep, choice = tuple(job.settings.fp16_keep_fp32), {"method": "given by settings"}
    else:
        present = {n.op_type for n in job.proto.graph.node}
        candidates = tuple(op for op in FP16_SENSITIVE_OPS if op in present)
        x = job.validation[: (32 if job.spec.kind is GraphKind.SCORING else 8)]

        def bits(model: onnx.ModelProto) -> float:
            return graph_bits(ReferenceRunner(model), job.spec.kind, job.spec.layout, x)

        ref, all16 = bits(job.proto), bits(to_fp16(job.proto, ()))
        # keeping ops in fp32 can only recover what all-fp16 lost: within the threshold, nothing to measure
        off = abs(all16 - ref) > job.settings.fp16_matter_rel * ref
        kept = bits(to_fp16(job.proto, candidates)) if candidates and off else None
        matters = kept is not None and abs(all16 - ref) - abs(kept - ref) > job.settings.fp16_matter_rel * ref
        keep = candidates if matters else ()
        choice = {"method": "numpy fp16 emulation (onnx.reference) on held-out tokens", "sequences": int(len(x)),
                  "bits_fp32": ref, "bits_all_fp16": all16, "bits_sensitive_ops_fp32": kept,
                  "candidates": list(candidates), "threshold_rel": job.settings.fp16_matter_rel,
                  "sensitive_ops_matter": bool(matters)}
    return to_fp16(job.proto, keep), {"fp16_choice": {"kept_fp32_op_types": list(keep), **choice}}


def calibration_reader(fp32_path: Path, spec, tokens: np.ndarray, batch: int = 32):
    """Feeds for ONNX Runtime's calibrator: batches of the task's training tokens for a scoring graph; for a
    decode graph every step of a teacher-forced fp32 rollout, so the cache inputs see every past length."""
    from onnxruntime.quantization import CalibrationDataReader

    if spec.kind is GraphKind.SCORING:
        feeds = [{"tokens": tokens[i:i + batch]} for i in range(0, len(tokens), batch)]
    else:
        runner, feeds = OrtRunner(fp32_path, threads=1), []
        for i in range(0, len(tokens), batch):
            rollout(runner, spec.layout, tokens[i:i + batch], on_feed=feeds.append)

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return next(self.feeds, None)

        def rewind(self):
            self.feeds = iter(feeds)

    reader = _Reader()
    reader.rewind()
    return reader


def int8_static(job: Conversion) -> tuple[onnx.ModelProto, dict]:
    """Static QDQ (per-channel symmetric weights, activations calibrated on training tokens), which TensorRT
    builds int8 engines from. Only a MatMul's inputs are quantized (TensorRT's placement): an output Q/DQ makes
    ONNX Runtime re-quantize every product, slower and less accurate (README, "Speed")."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    s = job.settings
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[str(s.calibrate_method)]
    act = QuantType.QInt8 if s.activation_type == "int8" else QuantType.QUInt8
    pre, out = job.workdir / "pre.onnx", job.workdir / "int8-static.onnx"
    with quiet():
        # ORT's recommended pre-pass (shape inference + basic folding); symbolic shape inference
        # cannot resolve the dynamic past axis, ONNX shape inference can.
        quant_pre_process(str(job.src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), calibration_reader(job.src, job.spec, job.calibration),
                        quant_format=QuantFormat.QDQ, per_channel=s.per_channel, activation_type=act,
                        weight_type=QuantType.QInt8, op_types_to_quantize=list(s.variant.converted_ops),
                        nodes_to_exclude=job.exclude, calibrate_method=method,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": s.activation_type == "int8",
                                       "OpTypesToExcludeOutputQuantization": list(s.variant.converted_ops)})
    return onnx.load(str(out)), {}


def int8_dynamic(job: Conversion) -> tuple[onnx.ModelProto, dict]:
    """Dynamic int8 MatMuls (weights quantized offline, activations per call): ONNX Runtime only."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = job.workdir / "int8-dynamic.onnx"
    with quiet():
        quantize_dynamic(str(job.src), str(out), op_types_to_quantize=list(job.settings.variant.converted_ops),
                         per_channel=job.settings.per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=job.exclude, extra_options={"MatMulConstBOnly": True})
    return onnx.load(str(out)), {}


CONVERTERS: dict[str, Callable[[Conversion], tuple[onnx.ModelProto, dict]]] = {
    "fp16": fp16, "int8-static": int8_static, "int8-dynamic": int8_dynamic}


def convert(name: str, job: Conversion) -> tuple[onnx.ModelProto, dict]:
    """Run the converter registered as `name` in a scratch folder of its own."""
    with tempfile.TemporaryDirectory() as td:
        return CONVERTERS[name](replace(job, workdir=Path(td)))
