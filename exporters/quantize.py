"""FP16 and INT8 variants of an exported graph, built with ONNX tooling and validated on task data.

FP16: onnxconverter_common.float16 (keep_io_types=True). Which numerically sensitive ops
stay fp32 is measured, not assumed: each candidate is run under true fp16 arithmetic
(onnx.reference, numpy) because ONNX Runtime's CPU provider silently computes most fp16
ops in fp32 and would hide the difference. INT8: onnxruntime.quantization, dynamic
(MatMul/Gemm weights) or static QDQ (per-channel symmetric weights, calibrated on the
task's training tokens) - the QDQ form is what TensorRT builds explicit-precision engines from.
Every variant's bits/dim is measured on held-out tokens next to the fp32 graph (and PyTorch
when the model is given); a variant over its budget is refused unless asked to just report.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from devices.errors import ProjectableEdgeError
from exporters.atomic import atomic_file
from exporters.onnx_io import (check_tokens, file_info, graph_kind, load_onnx, make_session,
                               tokens_sha256)
from exporters.parity import bits_from_logits, bits_per_dim_onnx, decode_rollout, empty_cache
from exporters.spec import attach_spec, read_spec

PRECISIONS = ("fp16", "int8-dynamic", "int8-static")
# Relative bits/dim increase over the fp32 graph a variant may cost before it is refused.
BUDGETS = {"fp16": 0.005, "int8-dynamic": 0.03, "int8-static": 0.03}
# Ops whose fp16 evaluation can overflow or lose mass (variance, exp, sums); candidates to keep fp32.
FP16_SENSITIVE_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Exp", "Log")
COMPUTE_OPS = ("MatMul", "Gemm", "LayerNormalization", "Softmax", "Erf", "Add", "Mul", "Div", "Sub",
               "Exp", "Log", "Pow", "Sqrt", "ReduceMean", "ReduceSum", "Tanh", "Sigmoid")


@dataclass(frozen=True)
class QuantizeSettings:
    precision: str
    # fp16: op types kept in fp32; None = measure FP16_SENSITIVE_OPS and keep them only if they matter
    fp16_keep_fp32: tuple[str, ...] | None = None
    fp16_matter_rel: float = 5e-4  # "matters" = keeping them fp32 recovers this much bits/dim (relative; 10% of budget)
    # int8-static
    activation_type: str = "int8"  # int8 = symmetric (TensorRT's explicit quantization needs it); uint8 = asym.
    per_channel: bool = True
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    calibration_sequences: int = 256  # at most this many calibration sequences are used (scoring graph)
    decode_calibration_sequences: int = 32  # decode graph: each sequence gives block_size calibration steps
    quantize_attention: bool = False  # also quantize the activation x activation attention MatMuls
    exclude_nodes: tuple[str, ...] = ()  # node names left in float (e.g. "head/MatMul")
    # validation
    budget_rel: float | None = None  # None = BUDGETS[precision]
    on_budget_fail: str = "raise"  # raise | report
    validation_sequences: int = 256

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ProjectableEdgeError(f"unknown precision {self.precision!r}: choose one of {', '.join(PRECISIONS)} "
                                       "(fp32 is the exported graph itself)")
        if self.activation_type not in ("int8", "uint8"):
            raise ProjectableEdgeError(f"activation_type must be 'int8' or 'uint8', got {self.activation_type!r}")
        if self.calibrate_method not in ("minmax", "entropy", "percentile"):
            raise ProjectableEdgeError(f"calibrate_method must be minmax, entropy or percentile, "
                                       f"got {self.calibrate_method!r}")
        if self.on_budget_fail not in ("raise", "report"):
            raise ProjectableEdgeError(f"on_budget_fail must be 'raise' or 'report', got {self.on_budget_fail!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs advice on the root logger and prints calibration progress."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, logging.WARNING))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


# ----------------------------------------------------------------------------- calibration


def calibration_reader(fp32_path: Path, spec, tokens: np.ndarray, batch: int = 32):
    """A CalibrationDataReader over task tokens: scoring feeds token batches; decode feeds every
    step of a teacher-forced fp32 rollout, so the KV cache inputs see realistic ranges at every past length."""
    from onnxruntime.quantization import CalibrationDataReader

    if spec.graph == "scoring":
        feeds = [{"tokens": tokens[i:i + batch]} for i in range(0, len(tokens), batch)]
    else:
        sess = make_session(fp32_path)
        feeds = []
        for i in range(0, len(tokens), batch):
            x = tokens[i:i + batch]
            n = len(x)
            pk, pv = empty_cache(spec, n), empty_cache(spec, n)
            feed = np.concatenate([np.full((n, 1), spec.bos_id, np.int64), x[:, :-1]], axis=1)
            for t in range(x.shape[1]):
                f = {"token": feed[:, t:t + 1], "past_keys": pk, "past_values": pv}
                feeds.append(f)
                _, pk, pv = sess.run(None, f)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    return _Reader()


# ----------------------------------------------------------------------------- converters


def _matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(weight MatMul/Gemm node names, activation x activation MatMul node names)."""
    inits = {i.name for i in model.graph.initializer}
    w, a = [], []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            (w if any(i in inits for i in n.input) else a).append(n.name)
    return w, a


def _fp16(model: onnx.ModelProto, keep: tuple[str, ...]) -> onnx.ModelProto:
    from onnxconverter_common import float16

    with _quiet():
        return float16.convert_float_to_float16(model, keep_io_types=True,
                                                op_block_list=list(float16.DEFAULT_OP_BLOCK_LIST) + list(keep))


def _emulated_bits(model: onnx.ModelProto, spec, tokens: np.ndarray) -> float:
    """bits/dim with every op evaluated in its declared dtype by numpy (onnx.reference)."""
    from onnx.reference import ReferenceEvaluator

    ev = ReferenceEvaluator(model)
    if spec.graph == "scoring":
        return bits_from_logits(ev.run(["logits"], {"tokens": tokens})[0], tokens)

    class _S:  # decode_rollout only needs .run
        run = staticmethod(lambda names, feeds: ev.run(None, feeds))
    return bits_from_logits(decode_rollout(_S, spec, tokens)[0], tokens)


def _choose_fp16_ops(model, spec, tokens, settings) -> tuple[tuple[str, ...], dict]:
    present = {n.op_type for n in model.graph.node}
    candidates = tuple(op for op in FP16_SENSITIVE_OPS if op in present)
    if settings.fp16_keep_fp32 is not None:
        return tuple(settings.fp16_keep_fp32), {"method": "given by settings"}
    x = tokens[: (32 if spec.graph == "scoring" else 8)]
    ref = _emulated_bits(model, spec, x)
    all16 = _emulated_bits(_fp16(model, ()), spec, x)
    kept = _emulated_bits(_fp16(model, candidates), spec, x)
    matters = abs(all16 - ref) - abs(kept - ref) > settings.fp16_matter_rel * ref
    return (candidates if matters else ()), {
        "method": "numpy fp16 emulation (onnx.reference) on held-out tokens", "sequences": int(len(x)),
        "bits_fp32": ref, "bits_all_fp16": all16, "bits_sensitive_ops_fp32": kept, "candidates": list(candidates),
        "threshold_rel": settings.fp16_matter_rel, "sensitive_ops_matter": bool(matters)}


def _int8_static(src: Path, spec, calib: np.ndarray, settings: QuantizeSettings, out: Path, exclude: list[str]):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[settings.calibrate_method]
    act = QuantType.QInt8 if settings.activation_type == "int8" else QuantType.QUInt8
    with tempfile.TemporaryDirectory() as td, _quiet():
        pre = Path(td) / "pre.onnx"
        # ORT's recommended pre-pass (shape inference + basic folding); symbolic shape inference
        # cannot resolve the dynamic past axis, ONNX shape inference can.
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), calibration_reader(src, spec, calib), quant_format=QuantFormat.QDQ,
                        per_channel=settings.per_channel, activation_type=act, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
                        calibrate_method=method,
                        extra_options={"WeightSymmetric": True,
                                       "ActivationSymmetric": settings.activation_type == "int8"})


def _int8_dynamic(src: Path, settings: QuantizeSettings, out: Path, exclude: list[str]):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet():
        quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul", "Gemm"],
                         per_channel=settings.per_channel, weight_type=QuantType.QInt8,
                         nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True})


# ----------------------------------------------------------------------------- reporting


def float_layers(model: onnx.ModelProto, precision: str, fp32_ops: tuple[str, ...] = ()) -> dict:
    """Name what a variant still computes in float32.

    int8: MatMul/Gemm nodes not fed by DequantizeLinear on both inputs (or not turned into
    MatMulInteger) plus counts of the other float compute ops; fp16: the nodes kept in fp32.
    """
    if precision == "fp16":
        kept = [n for n in model.graph.node if n.op_type in fp32_ops]
        return {"fp32_op_types": list(fp32_ops), "fp32_nodes": [f"{n.name} ({n.op_type})" for n in kept],
                "fp16_matmuls": [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]}
    prod = {o: n for n in model.graph.node for o in n.output}
    int8, floating, other = [], [], {}
    for n in model.graph.node:
        if n.op_type in ("MatMulInteger", "QLinearMatMul"):
            int8.append(n.name)
        elif n.op_type in ("MatMul", "Gemm"):
            fed = [prod[i].op_type if i in prod else "" for i in n.input[:2]]
            (int8 if all(f == "DequantizeLinear" for f in fed) else floating).append(n.name)
        elif n.op_type in COMPUTE_OPS:
            other[n.op_type] = other.get(n.op_type, 0) + 1
    return {"int8_matmuls": int8, "float_matmuls": floating, "other_float_ops": other}


def quantize(onnx_path: str | Path, settings: QuantizeSettings | dict | str, out_path: str | Path, *,
             calibration: np.ndarray | None = None, heldout: np.ndarray | None = None, model=None,
             overwrite: bool = False, log=None) -> tuple[Path, dict]:
    """Write one precision variant of an exported fp32 graph (scoring or decode) to out_path.

    calibration: the task's training tokens [N, T] (int8-static needs them; their sha256 is reported).
    heldout: validation tokens (falls back to calibration, then random tokens; the report says which).
    model: the SpecialisedModel, to also report bits/dim vs PyTorch.
    Report keys: precision, graph, source, output, sha256, bytes, settings, calibration, validation,
    bits_per_dim{variant, fp32, pytorch?, rel_vs_fp32, rel_vs_pytorch?, budget_rel, within_budget},
    float_layers, fp16_choice (fp16), op_types.
    """
    if isinstance(settings, str):
        settings = QuantizeSettings(precision=settings)
    elif isinstance(settings, dict):
        settings = QuantizeSettings(**settings)
    src = Path(onnx_path)
    proto = load_onnx(src)
    kind = graph_kind(proto)
    spec = read_spec(proto, str(src))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "MatMulInteger") for n in proto.graph.node) or \
            any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer):
        raise ProjectableEdgeError(f"{src} is already quantized or fp16; quantize the fp32 graph from "
                                   "`projectable-edge export` instead")
    calib_info = None
    if calibration is not None:
        calibration = check_tokens(calibration, spec.vocab_size, spec.block_size, "calibration tokens")
        calib_info = {"sha256": tokens_sha256(calibration), "n": int(len(calibration)),
                      "seq": int(calibration.shape[1])}
    if settings.precision == "int8-static":
        if calibration is None:
            raise ProjectableEdgeError("int8-static needs calibration tokens: pass the task's training tokens "
                                       "(--calibration TOKENS.npy, an int [N, T] array)")
        calibration = calibration[: settings.calibration_sequences if kind == "scoring"
                                  else settings.decode_calibration_sequences]
        calib_info.update(used=int(len(calibration)), used_sha256=tokens_sha256(calibration),
                          method=settings.calibrate_method)
    if heldout is not None:
        val, val_source = check_tokens(heldout, spec.vocab_size, spec.block_size, "held-out tokens"), "heldout"
    elif calibration is not None:
        val, val_source = calibration, "calibration (no held-out tokens given)"
    else:
        val = np.random.default_rng(0).integers(0, spec.vocab_size, (32, spec.block_size))
        val, val_source = val.astype(np.int64), "random (no held-out tokens given)"
    val = val[: settings.validation_sequences]

    w_mm, a_mm = _matmuls(proto)
    exclude = list(settings.exclude_nodes) + ([] if settings.quantize_attention else a_mm)
    unknown = sorted(set(settings.exclude_nodes) - {n.name for n in proto.graph.node})
    if unknown:
        raise ProjectableEdgeError(f"exclude_nodes names nodes not in {src}: {unknown}; "
                                   f"MatMul nodes are: {', '.join(w_mm + a_mm)}")
    report: dict = {"precision": settings.precision, "graph": kind, "source": str(src),
                    "source_sha256": file_info(src)["sha256"], "settings": settings.to_dict(),
                    "calibration": calib_info}
    out_path = Path(out_path)
    with atomic_file(out_path, overwrite=overwrite) as tmp:
        if log:
            log(f"quantizing {src.name} ({kind}) to {settings.precision}")
        if settings.precision == "fp16":
            keep, choice = _choose_fp16_ops(proto, spec, val, settings)
            out = _fp16(proto, keep)
            report["fp16_choice"] = {"kept_fp32_op_types": list(keep), **choice}
        else:
            if settings.precision == "int8-static":
                _int8_static(src, spec, calibration, settings, tmp, exclude)
            else:
                _int8_dynamic(src, settings, tmp, exclude)
            out = onnx.load(str(tmp))
        attach_spec(out, spec)
        onnx.checker.check_model(out, full_check=True)
        onnx.save(out, str(tmp))

        # validate like fp32: a real ORT session, bits/dim on held-out tokens next to fp32 (and PyTorch)
        variant = bits_per_dim_onnx(make_session(tmp), val, spec)
        fp32 = bits_per_dim_onnx(make_session(src), val, spec)
        budget = settings.budget_rel if settings.budget_rel is not None else BUDGETS[settings.precision]
        bits = {"variant": variant, "fp32": fp32, "rel_vs_fp32": (variant - fp32) / fp32, "budget_rel": budget}
        if model is not None:
            from exporters.parity import bits_per_dim_torch, check_parity

            torch_bits = bits_per_dim_torch(model, val)
            bits.update(pytorch=torch_bits, rel_vs_pytorch=(variant - torch_bits) / torch_bits)
            report["parity"] = check_parity(tmp, model, val, precision=settings.precision,
                                            raise_on_fail=False, log=log or (lambda s: None))
        bits["within_budget"] = bool(bits["rel_vs_fp32"] <= budget)
        report["bits_per_dim"] = bits
        report["validation"] = {"source": val_source, "n": int(len(val)), "sha256": tokens_sha256(val)}
        report["float_layers"] = float_layers(out, settings.precision,
                                              tuple(report.get("fp16_choice", {}).get("kept_fp32_op_types", ())))
        report["op_types"] = sorted({n.op_type for n in out.graph.node})
        line = (f"{kind} {settings.precision}: bits/dim {variant:.5f} vs fp32 {fp32:.5f} "
                f"({bits['rel_vs_fp32']:+.3%}, budget +{budget:.1%})"
                + (f", vs pytorch {bits['rel_vs_pytorch']:+.3%}" if model is not None else ""))
        report["line"] = line
        if log:
            log(line)
        if not bits["within_budget"] and settings.on_budget_fail == "raise":
            raise ProjectableEdgeError(
                f"{settings.precision} variant of {src.name} breaks its accuracy budget: {line}. Nothing was "
                "written. Use another precision, keep sensitive layers in float (exclude_nodes), or pass "
                "on_budget_fail='report' to write it anyway")
    report.update(output=str(out_path), **file_info(out_path))
    return out_path, report
