"""Converted variants of an exported fp32 graph (fp16, int8), each validated the same way whatever its
converter: a real ONNX Runtime session, bits/dim on held-out tokens next to the fp32 graph (and PyTorch when
the model is given). A variant over its budget is refused unless asked to just report."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import StrEnum, choose
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.converters import Conversion, convert
from projectable_edge.exporters.onnx_io import check_tokens, load_onnx, producers, tokens_sha256, variant_of
from projectable_edge.exporters.parity import graph_bits
from projectable_edge.exporters.spec import attach_spec, read_spec
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.bundle.manifest import file_info
from projectable_edge_runtime.graphs.contract import kind_of
from projectable_edge_runtime.graphs.runners import OrtRunner

COMPUTE_OPS = ("MatMul", "Gemm", "LayerNormalization", "Softmax", "Erf", "Add", "Mul", "Div", "Sub",
               "Exp", "Log", "Pow", "Sqrt", "ReduceMean", "ReduceSum", "Tanh", "Sigmoid")


CalibrateMethod = StrEnum("CalibrateMethod", {"MINMAX": "minmax", "ENTROPY": "entropy", "PERCENTILE": "percentile"})
ActivationType = StrEnum("ActivationType", {"INT8": "int8", "UINT8": "uint8"})
OnBudgetFail = StrEnum("OnBudgetFail", {"RAISE": "raise", "REPORT": "report"})


@dataclass(frozen=True)
class QuantizeSettings:
    precision: str
    # fp16: op types kept in fp32; None = measure FP16_SENSITIVE_OPS and keep them only if they matter
    fp16_keep_fp32: tuple[str, ...] | None = None
    fp16_matter_rel: float = 5e-4  # "matters" = keeping them fp32 recovers this much bits/dim (relative; 10% of budget)
    # int8-static
    activation_type: str = "int8"  # symmetric, which TensorRT's explicit quantization needs; or "uint8"
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
        for key in ("fp16_keep_fp32", "exclude_nodes"):  # a lone name is one name, not its letters
            v = getattr(self, key)
            v = (v,) if isinstance(v, str) else v
            if v is not None and (not isinstance(v, (tuple, list)) or not all(isinstance(x, str) for x in v)):
                raise ProjectableEdgeError(f"quantize option '{key}' must be a list of names, got {v!r}")
            object.__setattr__(self, key, None if v is None else tuple(v))
        for key in ("calibration_sequences", "decode_calibration_sequences", "validation_sequences"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ProjectableEdgeError(f"quantize option '{key}' must be a whole number >= 1, got {v!r}")
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
        return {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, StrEnum) else v
                for k, v in asdict(self).items()}


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


def _exclusions(proto: onnx.ModelProto, src: Path, settings: QuantizeSettings) -> list[str]:
    """The nodes left in float: those asked for, plus the activation x activation MatMuls unless quantize_attention."""
    inits = {i.name for i in proto.graph.initializer}
    mms = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    attention = [n.name for n in mms if not any(i in inits for i in n.input)]
    unknown = sorted(set(settings.exclude_nodes) - {n.name for n in proto.graph.node})
    if unknown:
        weights = [n.name for n in mms if n.name not in attention]
        raise ProjectableEdgeError(f"exclude_nodes names nodes not in {src}: {unknown}; "
                                   f"MatMul nodes are: {', '.join(weights + attention)}")
    return list(settings.exclude_nodes) + ([] if settings.quantize_attention else attention)


def float_layers(model: onnx.ModelProto, precision: str, fp32_ops: tuple[str, ...] = ()) -> dict:
    """What a variant still computes in float32: the nodes kept fp32 (fp16, which lowers every op), or
    the lowered op types' nodes not dequantized on both inputs plus counts of other float compute ops (int8)."""
    lowered = variants.get(precision).converted_ops
    if lowered is None:
        kept = [n for n in model.graph.node if n.op_type in fp32_ops]
        return {"fp32_op_types": list(fp32_ops), "fp32_nodes": [f"{n.name} ({n.op_type})" for n in kept],
                "fp16_matmuls": [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]}
    prod = producers(model)
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


def _measure(path: Path, fp32: float, spec, val: np.ndarray, settings: QuantizeSettings, model, log) -> dict:
    """bits/dim of the variant next to fp32 (and PyTorch), with the parity report when the model is given (which
    measures the variant's and PyTorch's bits/dim on these tokens: each is computed once)."""
    extra = {}
    if model is not None:
        from projectable_edge.exporters.parity import check_parity

        extra["parity"] = check_parity(path, model, val, precision=settings.precision, raise_on_fail=False,
                                       log=log)
        variant = extra["parity"]["bits_per_dim"]["onnx"]
    else:
        variant = graph_bits(OrtRunner(path, threads=1), spec.kind, spec.layout, val)
    bits = {"variant": variant, "fp32": fp32, "rel_vs_fp32": (variant - fp32) / fp32, "budget_rel": settings.budget}
    if model is not None:
        torch_bits = extra["parity"]["bits_per_dim"]["pytorch"]
        bits.update(pytorch=torch_bits, rel_vs_pytorch=(variant - torch_bits) / torch_bits)
    bits["within_budget"] = bool(bits["rel_vs_fp32"] <= settings.budget)
    return {"bits_per_dim": bits, **extra}


def quantize(onnx_path: str | Path, settings: QuantizeSettings | dict | str, out_path: str | Path, *,
             calibration: np.ndarray | None = None, heldout: np.ndarray | None = None, model=None,
             overwrite: bool = False, log=None) -> tuple[Path, dict]:
    """Write one precision variant of an exported fp32 graph to out_path. calibration: the task's training
    tokens (int8-static needs them); heldout: validation tokens (else calibration, else random: the report
    says which); model: the exported model, to also report bits/dim vs PyTorch."""
    try:
        settings = QuantizeSettings(precision=settings) if isinstance(settings, str) else \
            QuantizeSettings(**settings) if isinstance(settings, dict) else settings
    except TypeError as e:  # a key that is no option, or none of them
        raise ProjectableEdgeError(f"quantize settings: {e}; see exporters.quantize.QuantizeSettings") from None
    if not isinstance(settings, QuantizeSettings):
        raise ProjectableEdgeError(f"quantize settings must be a precision name, a dict or a QuantizeSettings, got "
                                   f"{settings!r}")
    src, out_path, log = Path(onnx_path), Path(out_path), log or (lambda s: None)
    proto = load_onnx(src)
    if variant_of(proto) != "fp32":
        raise ProjectableEdgeError(f"{src} is already quantized or fp16; quantize the fp32 graph from "
                                   "`projectable-edge export` instead")
    if overwrite and out_path.is_file():  # an earlier quantized graph only: never the input itself, nor another file
        try:
            ours = variant_of(load_onnx(out_path)) != "fp32"
        except ProjectableEdgeError:
            ours = False
        if not ours:
            raise ProjectableEdgeError(f"{out_path} is not a graph written by `quantize` (it is an fp32 graph or "
                                       "another file), so --overwrite does not replace it; choose another --out")
    kind, spec = kind_of(i.name for i in proto.graph.input), read_spec(proto, str(src))
    calibration, calib_info = _calibration(calibration, spec, settings)
    val, val_source = _validation(heldout, calibration, spec, settings)
    job = Conversion(src, proto, spec, settings, calibration, val, _exclusions(proto, src, settings))
    fp32 = graph_bits(OrtRunner(src, threads=1), spec.kind, spec.layout, val)
    if not math.isfinite(fp32):  # a broken graph (an op removed): nothing a converter or its budget can judge
        raise ProjectableEdgeError(f"{src} gives bits/dim {fp32} on the {val_source.split(' (')[0]} tokens: the graph "
                                   "is broken; export the model again")
    report: dict = {"precision": settings.precision, "graph": str(kind), "source": str(src),
                    "source_sha256": file_info(src)["sha256"], "settings": settings.to_dict(),
                    "calibration": calib_info}
    with atomic_output(out_path, overwrite=overwrite) as tmp:
        log(f"quantizing {src.name} ({kind}) to {settings.precision}")
        out, extras = convert(settings.variant.converter, job)
        report.update(extras)
        attach_spec(out, spec)
        onnx.checker.check_model(out, full_check=True)
        onnx.save(out, str(tmp))
        report.update(_measure(tmp, fp32, spec, val, settings, model, log))
        report["validation"] = {"source": val_source, "n": int(len(val)), "sha256": tokens_sha256(val)}
        kept = tuple(report.get("fp16_choice", {}).get("kept_fp32_op_types", ()))
        report["float_layers"] = float_layers(out, settings.precision, kept)
        report["op_types"] = sorted({n.op_type for n in out.graph.node})
        bits = report["bits_per_dim"]
        report["line"] = line = (f"{kind} {settings.precision}: bits/dim {bits['variant']:.5f} vs fp32 "
                                 f"{bits['fp32']:.5f} ({bits['rel_vs_fp32']:+.3%}, budget +{bits['budget_rel']:.1%})"
                                 + (f", vs pytorch {bits['rel_vs_pytorch']:+.3%}" if "pytorch" in bits else ""))
        log(line)
        if not bits["within_budget"] and settings.on_budget_fail == OnBudgetFail.RAISE:
            raise ProjectableEdgeError(
                f"{settings.precision} variant of {src.name} breaks its accuracy budget: {line}. Nothing was "
                "written. Use another precision, keep sensitive layers in float (exclude_nodes), or pass "
                "on_budget_fail='report' to write it anyway")
    report.update(output=str(out_path), **file_info(out_path))
    return out_path, report
