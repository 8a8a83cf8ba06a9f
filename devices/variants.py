"""The one registry of graph variants (precisions): how each is named, judged, built and compiled.

It sits in `devices`, the bottom layer, because a device profile lists precisions; the runtime,
the exporters, the pipeline and both CLIs read the same entries instead of keeping their own
tables. Adding a precision = one `Variant` entry here + one converter registered in
exporters/converters.py (see "Adding a precision" in the README).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ProjectableEdgeError

# How far the same graph may drift between machines, relative to its bits/dim (kernels differ, not the model).
DEVICE_DRIFT_REL = 0.01


@dataclass(frozen=True)
class Tolerance:
    """An output element fails parity when |graph - reference| > atol + rtol * |reference|."""

    atol: float
    rtol: float


def _tolerances(logits: Tolerance, cache: Tolerance) -> dict[str, Tolerance]:
    return {"logits": logits, "present_keys": cache, "present_values": cache}


@dataclass(frozen=True)
class Family:
    """A numeric family (what TensorRT and the hardware see) and the facts keyed by it."""

    name: str
    bytes_per_weight: float  # what the latency estimate charges per weight
    peak_field: str  # the device profile's [performance] field giving its peak rate
    marker: str  # its marker in the report's charts


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("fp32", 4, "fp32_gflops", "o"), Family("fp16", 2, "fp16_gflops", "s"), Family("int8", 1, "int8_gops", "^"))}


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise ProjectableEdgeError(f"unknown numeric family {name!r}: the variant registry knows {', '.join(FAMILIES)}")
    return FAMILIES[name]


@dataclass(frozen=True)
class Variant:
    name: str  # the graph variant in a bundle and on the CLI, e.g. "int8-static"
    family: str  # numeric family (fp32 | fp16 | int8): what TensorRT and the hardware see
    precision: str | None  # the word device profiles and --precision use for it (None: not offered)
    budget_rel: float  # largest relative bits/dim increase over fp32 (for fp32 itself: over PyTorch, either way)
    converter: str | None  # key of its converter in exporters.converters (None: the exported graph)
    tensorrt_flags: tuple[str, ...]  # builder precision flags an engine of it needs ("fp16", "int8")
    tensorrt_buildable: bool  # TensorRT's ONNX parser can build it (no ORT-only ops)
    description: str
    tolerances: dict[str, Tolerance] = field(default_factory=dict, compare=False, hash=False)
    marker_ops: tuple[str, ...] = ()  # op types that only this variant's graphs contain (how a file is recognised)
    qdq: bool = False  # the graph carries its own quantization scales (TensorRT explicit quantization)
    calibrated: bool = False  # its converter needs the task's calibration tokens
    converted_ops: tuple[str, ...] | None = None  # op types its converter lowers (None: every op not kept in fp32)

    @property
    def tolerance_rel(self) -> float:
        """What validation allows on any machine, relative to the fp32 PyTorch reference on the goldens:
        the variant's accuracy budget plus the device drift."""
        return self.budget_rel + DEVICE_DRIFT_REL

    def tolerance(self, output: str) -> Tolerance:
        return self.tolerances[output]


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant(name="fp32", family="fp32", precision="fp32", budget_rel=1e-4, converter=None,
            tensorrt_flags=(), tensorrt_buildable=True, description="the exported graph itself",
            tolerances=_tolerances(Tolerance(1e-4, 0.0), Tolerance(1e-4, 0.0))),
    Variant(name="fp16", family="fp16", precision="fp16", budget_rel=0.005, converter="fp16",
            tensorrt_flags=("fp16",), tensorrt_buildable=True,
            description="weights and most ops in fp16, I/O in fp32 (onnxconverter-common)",
            tolerances=_tolerances(Tolerance(0.1, 0.02), Tolerance(0.05, 0.02))),
    Variant(name="int8-static", family="int8", precision="int8", budget_rel=0.03, converter="int8-static",
            tensorrt_flags=("int8",), tensorrt_buildable=True,
            description="static QDQ: per-channel symmetric int8 weights, activations calibrated on task data",
            tolerances=_tolerances(Tolerance(1.0, 0.1), Tolerance(0.5, 0.1)),
            marker_ops=("QuantizeLinear", "DequantizeLinear"), qdq=True, calibrated=True,
            converted_ops=("MatMul", "Gemm")),
    Variant(name="int8-dynamic", family="int8", precision=None, budget_rel=0.03, converter="int8-dynamic",
            tensorrt_flags=("int8",), tensorrt_buildable=False,
            description="dynamic int8 MatMuls (MatMulInteger): ONNX Runtime only",
            tolerances=_tolerances(Tolerance(1.0, 0.1), Tolerance(0.5, 0.1)),
            marker_ops=("MatMulInteger", "DynamicQuantizeLinear"), converted_ops=("MatMul", "Gemm")),
)}
FP32 = VARIANTS["fp32"]


def profile_precisions() -> tuple[str, ...]:
    """The words a device profile may list in `precisions`, in registry order."""
    return tuple(v.precision for v in VARIANTS.values() if v.precision)


def converted() -> tuple[str, ...]:
    """Variants built from the fp32 graph by a converter (what `quantize` offers)."""
    return tuple(v.name for v in VARIANTS.values() if v.converter)


def get(name: str) -> Variant:
    """A variant by its name or by a profile's word for it ('int8' -> int8-static)."""
    if name in VARIANTS:
        return VARIANTS[name]
    for v in VARIANTS.values():
        if v.precision == name:
            return v
    raise ProjectableEdgeError(f"unknown precision {name!r}: choose one of "
                               f"{', '.join(dict.fromkeys([*profile_precisions(), *VARIANTS]))}")


def resolve(name: str, available) -> str | None:
    """The one variant in `available` that `name` means (exact name, else the profile word), or None."""
    if name in available:
        return name
    try:
            wanted = get(name).name
    except ProjectableEdgeError:
        wanted = None
    if wanted in available:
        return wanted
    same_family = [a for a in available if a in VARIANTS and VARIANTS[a].family == name]
    return same_family[0] if len(same_family) == 1 else None
