"""Converted variants of an exported fp32 graph (FP16, INT8), each validated on task data.

The variant registry (devices/variants.py) says which precisions exist and what each may
cost; exporters/converters.py holds one converter per precision. This module runs the one
that is asked for, then validates the result the same way for every precision: a real ONNX
Runtime session, bits/dim on held-out tokens next to the fp32 graph (and PyTorch when the
model is given). A variant over its budget is refused unless asked to just report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import StrEnum, choose
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.converters import Conversion, convert
from projectable_edge.exporters.onnx_io import check_tokens, file_info, graph_kind, load_onnx, tokens_sha256, variant_of
from projectable_edge.exporters.parity import graph_bits
from projectable_edge.exporters.spec import attach_spec, read_spec
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.graphs.runners import OrtRunner

COMPUTE_OPS = ("MatMul", "Gemm", "LayerNormalization", "Softmax", "Erf", "Add", "Mul", "Div", "Sub",
               "Exp", "Log", "Pow", "Sqrt", "ReduceMean", "ReduceSum", "Tanh", "Sigmoid")


class CalibrateMethod(StrEnum):
    MINMAX = "minmax"
    ENTROPY = "entropy"
    PERCENTILE = "percentile"


class ActivationType(StrEnum):
    INT8 = "int8"  # symmetric: TensorRT's explicit quantization needs it
    UINT8 = "uint8"  # asymmetric


class OnBudgetFail(StrEnum):
    RAISE = "raise"
    REPORT = "report"


@dataclass(frozen=True)
class QuantizeSettings:
    precision: str
    # fp16: op types kept in fp32; None = measure FP16_SENSITIVE_OPS and keep them only if they matter
    fp16_keep_fp32: tuple[str, ...] | None = None
    fp16_matter_rel: float = 5e-4  # "matters" = keeping them fp32 recovers this much bits/dim (relative; 10% of budget)
    # int8-static
    activation_type: str = "int8"
    per_channel: bool = True
    calibrate_method: str = "minmax"
    calibration_sequences: int = 256  # at most this many calibration sequences are used (scoring graph)
    decode_calibration_sequences: int = 32  # decode graph: each sequence gives block_size calibration steps
    quantize_attention: bool = False  # also quantize the activation x activation attention MatMuls
    exclude_nodes: tuple[str, ...] = ()  # node names left in float (e.g. "head/MatMul")
    # validation
    budget_rel: float | None = None  # None = the variant registry's budget for this precision
    on_budget_fail: str = "raise"
    validation_sequences: int = 256

    def __post_init__(self):
        if self.precision not in variants.converted():
            raise ProjectableEdgeError(f"unknown precision {self.precision!r}: choose one of "
                                       f"{', '.join(variants.converted())} (fp32 is the exported graph itself)")
        for key, kind, what in (("activation_type", ActivationType, "activation type"),
                                ("calibrate_method", CalibrateMethod, "calibration method"),
                                ("on_budget_fail", OnBudgetFail, "on_budget_fail")):
            object.__setattr__(self, key, choose(kind, getattr(self, key), what))

    @property
    def variant(self) -> variants.Variant:
        return variants.get(self.precision)

    @property
    def budget(self) -> float:
        return self.budget_rel if self.budget_rel is not None else self.variant.budget_rel

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, StrEnum) else v
                for k, v in d.items()}


# ----------------------------------------------------------------------------- inputs


def _load_fp32(src: Path):
    proto = load_onnx(src)
    if variant_of(proto) != "fp32":
        raise ProjectableEdgeError(f"{src} is already quantized or fp16; quantize the fp32 graph from "
                                   "`projectable-edge export` instead")
    return proto, graph_kind(proto), read_spec(proto, str(src))


def _calibration(calibration, spec, settings: QuantizeSettings) -> tuple[np.ndarray | None, dict | None]:
    """The calibration tokens actually used, and their fingerprint for the report."""
    if calibration is None:
        if settings.variant.calibrated:
            raise ProjectableEdgeError(f"{settings.precision} needs calibration tokens: pass the task's training "
                                       "tokens (--calibration TOKENS.npy, an int [N, T] array)")
        return None, None
    calibration = check_tokens(calibration, spec.vocab_size, spec.block_size, "calibration tokens")
    info = {"sha256": tokens_sha256(calibration), "n": int(len(calibration)), "seq": int(calibration.shape[1])}
    if settings.variant.calibrated:
        calibration = calibration[: settings.calibration_sequences if spec.graph == "scoring"
                                  else settings.decode_calibration_sequences]
        info.update(used=int(len(calibration)), used_sha256=tokens_sha256(calibration),
                    method=str(settings.calibrate_method))
    return calibration, info


def _validation(heldout, calibration, spec, settings: QuantizeSettings) -> tuple[np.ndarray, str]:
    if heldout is not None:
        val, source = check_tokens(heldout, spec.vocab_size, spec.block_size, "held-out tokens"), "heldout"
    elif calibration is not None:
        val, source = calibration, "calibration (no held-out tokens given)"
    else:
        val = np.random.default_rng(0).integers(0, spec.vocab_size, (32, spec.block_size)).astype(np.int64)
        source = "random (no held-out tokens given)"
    return val[: settings.validation_sequences], source


def _matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(weight MatMul/Gemm node names, activation x activation MatMul node names)."""
    inits = {i.name for i in model.graph.initializer}
    w, a = [], []
    for n in model.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            (w if any(i in inits for i in n.input) else a).append(n.name)
    return w, a


def _exclusions(proto: onnx.ModelProto, src: Path, settings: QuantizeSettings) -> list[str]:
    w_mm, a_mm = _matmuls(proto)
    unknown = sorted(set(settings.exclude_nodes) - {n.name for n in proto.graph.node})
    if unknown:
        raise ProjectableEdgeError(f"exclude_nodes names nodes not in {src}: {unknown}; "
                                   f"MatMul nodes are: {', '.join(w_mm + a_mm)}")
    return list(settings.exclude_nodes) + ([] if settings.quantize_attention else a_mm)


# ----------------------------------------------------------------------------- reporting


def float_layers(model: onnx.ModelProto, precision: str, fp32_ops: tuple[str, ...] = ()) -> dict:
    """Name what a variant still computes in float32.

    A variant that lowers some op types (int8: MatMul/Gemm): those nodes not fed by DequantizeLinear on
    both inputs (or not turned into MatMulInteger) plus counts of the other float compute ops; one that
    lowers every op (fp16): the nodes kept in fp32.
    """
    lowered = variants.get(precision).converted_ops
    if lowered is None:
        kept = [n for n in model.graph.node if n.op_type in fp32_ops]
        return {"fp32_op_types": list(fp32_ops), "fp32_nodes": [f"{n.name} ({n.op_type})" for n in kept],
                "fp16_matmuls": [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]}
    prod = {o: n for n in model.graph.node for o in n.output}
    int8, floating, other = [], [], {}
    for n in model.graph.node:
        if n.op_type in ("MatMulInteger", "QLinearMatMul"):
            int8.append(n.name)
        elif n.op_type in lowered:
            fed = [prod[i].op_type if i in prod else "" for i in n.input[:2]]
            (int8 if all(f == "DequantizeLinear" for f in fed) else floating).append(n.name)
        elif n.op_type in COMPUTE_OPS:
            other[n.op_type] = other.get(n.op_type, 0) + 1
    return {"int8_matmuls": int8, "float_matmuls": floating, "other_float_ops": other}


def _measure(path: Path, src: Path, spec, val: np.ndarray, settings: QuantizeSettings, model, log) -> dict:
    """bits/dim of the variant next to fp32 (and PyTorch), with the parity report when the model is given."""
    variant = graph_bits(OrtRunner(path, threads=1), spec.kind, spec.layout, val)
    fp32 = graph_bits(OrtRunner(src, threads=1), spec.kind, spec.layout, val)
    bits = {"variant": variant, "fp32": fp32, "rel_vs_fp32": (variant - fp32) / fp32, "budget_rel": settings.budget}
    extra = {}
    if model is not None:
        from projectable_edge.exporters.parity import bits_per_dim_torch, check_parity

        torch_bits = bits_per_dim_torch(model, val)
        bits.update(pytorch=torch_bits, rel_vs_pytorch=(variant - torch_bits) / torch_bits)
        extra["parity"] = check_parity(path, model, val, precision=settings.precision, raise_on_fail=False,
                                       log=log or (lambda s: None))
    bits["within_budget"] = bool(bits["rel_vs_fp32"] <= settings.budget)
    return {"bits_per_dim": bits, **extra}


def _line(kind, precision: str, bits: dict) -> str:
    return (f"{kind} {precision}: bits/dim {bits['variant']:.5f} vs fp32 {bits['fp32']:.5f} "
            f"({bits['rel_vs_fp32']:+.3%}, budget +{bits['budget_rel']:.1%})"
            + (f", vs pytorch {bits['rel_vs_pytorch']:+.3%}" if "pytorch" in bits else ""))


# ----------------------------------------------------------------------------- the step


def _settings(settings: QuantizeSettings | dict | str) -> QuantizeSettings:
    if isinstance(settings, str):
        return QuantizeSettings(precision=settings)
    return QuantizeSettings(**settings) if isinstance(settings, dict) else settings


def quantize(onnx_path: str | Path, settings: QuantizeSettings | dict | str, out_path: str | Path, *,
             calibration: np.ndarray | None = None, heldout: np.ndarray | None = None, model=None,
             overwrite: bool = False, log=None) -> tuple[Path, dict]:
    """Write one precision variant of an exported fp32 graph (scoring or decode) to out_path.

    calibration: the task's training tokens [N, T] (int8-static needs them; their sha256 is reported).
    heldout: validation tokens (falls back to calibration, then random tokens; the report says which).
    model: the exported model (exporters.protocol.ExportableModel), to also report bits/dim vs PyTorch.
    Report keys: precision, graph, source, output, sha256, bytes, settings, calibration, validation,
    bits_per_dim{variant, fp32, pytorch?, rel_vs_fp32, rel_vs_pytorch?, budget_rel, within_budget},
    float_layers, fp16_choice (fp16), op_types, line.
    """
    settings, src, out_path = _settings(settings), Path(onnx_path), Path(out_path)
    proto, kind, spec = _load_fp32(src)
    calibration, calib_info = _calibration(calibration, spec, settings)
    val, val_source = _validation(heldout, calibration, spec, settings)
    job = Conversion(src, proto, spec, settings, calibration, val, _exclusions(proto, src, settings))
    report: dict = {"precision": settings.precision, "graph": str(kind), "source": str(src),
                    "source_sha256": file_info(src)["sha256"], "settings": settings.to_dict(),
                    "calibration": calib_info}
    with atomic_output(out_path, overwrite=overwrite) as tmp:
        if log:
            log(f"quantizing {src.name} ({kind}) to {settings.precision}")
        out, extras = convert(settings.variant.converter, job)
        report.update(extras)
        attach_spec(out, spec)
        onnx.checker.check_model(out, full_check=True)
        onnx.save(out, str(tmp))
        report.update(_measure(tmp, src, spec, val, settings, model, log))
        report["validation"] = {"source": val_source, "n": int(len(val)), "sha256": tokens_sha256(val)}
        kept = tuple(report.get("fp16_choice", {}).get("kept_fp32_op_types", ()))
        report["float_layers"] = float_layers(out, settings.precision, kept)
        report["op_types"] = sorted({n.op_type for n in out.graph.node})
        report["line"] = line = _line(kind, settings.precision, report["bits_per_dim"])
        if log:
            log(line)
        if not report["bits_per_dim"]["within_budget"] and settings.on_budget_fail == OnBudgetFail.RAISE:
            raise ProjectableEdgeError(
                f"{settings.precision} variant of {src.name} breaks its accuracy budget: {line}. Nothing was "
                "written. Use another precision, keep sensitive layers in float (exclude_nodes), or pass "
                "on_budget_fail='report' to write it anyway")
    report.update(output=str(out_path), **file_info(out_path))
    return out_path, report
