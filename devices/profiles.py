"""Device profiles: one TOML file per target in this directory, loaded and validated here.

Adding a device = adding a TOML file next to this module. Standard library only. TOML is read
only on the host (`tomllib`, or `tomli` on Python 3.10, imported inside `_load_file`): on the
device the runtime builds its profile from the manifest's JSON (`DeviceProfile.from_dict`), so
importing this module needs no TOML reader.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .choices import Arch, CompileBackend, values
from .errors import ProjectableEdgeError
from . import variants
from .variants import profile_precisions

DEFAULT_TARGET = "x86-64-cpu"
EXECUTION_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ROCMExecutionProvider",
    "MIGraphXExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
    "XnnpackExecutionProvider",
    "ACLExecutionProvider",
    "ArmNNExecutionProvider",
    "QNNExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)
# Lower-case, digits, '.', '-': safe in a directory name, and cannot contain the '__'
# that separates task and target in bundles/<task>__<target>.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")


def _doc(text: str, **kw) -> Any:
    return field(metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class TensorRTOptions:
    fp16: bool = _doc("Allow fp16 kernels.")
    int8: bool = _doc("Allow int8 kernels (QDQ graphs carry their scales).")
    dla_core: int = _doc("DLA core to build for; -1 = GPU only.")
    dla_cores: int = _doc("DLA cores the device has (0 on most).")
    workspace_mb: int = _doc("Builder workspace.")
    min_shapes: dict[str, int] = _doc("`batch` of the optimization profile's minimum: 1 (lengths come from the model).")
    opt_shapes: dict[str, int] = _doc("`batch` it is optimised for.")
    max_shapes: dict[str, int] = _doc("`batch` limit: the runtime splits larger batches.")


@dataclass(frozen=True)
class Budgets:
    p99_latency_ms: float = _doc("p99 latency of scoring one image (batch 1).")
    memory_mb: int = _doc("Peak resident memory of the runtime process.")


@dataclass(frozen=True)
class Performance:
    """Published peak numbers of the device, for host-side latency *estimates* only (never a measurement)."""

    fp32_gflops: float = _doc("Peak fp32 rate.")
    fp16_gflops: float = _doc("Peak fp16 rate.")
    int8_gops: float = _doc("Peak dense int8 rate (no structured sparsity).")
    memory_bandwidth_gbs: float = _doc("Memory bandwidth.")
    source: str = _doc("Where the numbers come from (datasheet, or how they were derived).")

    def peak_ops(self, family: str) -> float:
        """Peak operations per second of one numeric family (the variant registry names its field)."""
        return getattr(self, variants.family(family).peak_field) * 1e9


@dataclass(frozen=True)
class DeviceProfile:
    name: str = _doc("The profile's name (devices/NAME.toml).")
    aliases: tuple[str, ...] = _doc("Other names `--target` accepts.")
    description: str = _doc("The device in words.")
    arch: str = _doc("CPU architecture (`aarch64`, `x86_64`).")
    memory_mb: int = _doc("Device memory.")
    precisions: tuple[str, ...] = _doc("Precisions to build, in preference order (the variant registry's words).")
    compile_backend: CompileBackend = _doc("How graphs are compiled for it.")
    execution_providers: tuple[str, ...] = _doc("ONNX Runtime execution providers, in order.")
    threads: int = _doc("ONNX Runtime intra-op threads; 0 = ONNX Runtime's default.")
    software: dict[str, str] = _doc("Versions the device ships (jetpack, tensorrt, ...).")
    tensorrt: TensorRTOptions | None = _doc("TensorRT builder options (TensorRT targets).")
    budgets: Budgets = _doc("What `generate`, `benchmark` and `tune` check against.")
    performance: Performance | None = _doc("Published peaks, for latency ESTIMATES only.", default=None)
    source_file: str = field(default="", compare=False, metadata={"json": False})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the bundle manifest; `from_dict` reads it back."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "description": self.description,
            "arch": self.arch,
            "memory_mb": self.memory_mb,
            "precisions": list(self.precisions),
            "compile_backend": str(self.compile_backend),
            "execution_providers": list(self.execution_providers),
            "threads": self.threads,
            "software": dict(self.software),
            "tensorrt": asdict(self.tensorrt) if self.tensorrt is not None else None,
            "budgets": asdict(self.budgets),
            **({"performance": asdict(self.performance)} if self.performance is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<profile dict>") -> DeviceProfile:
        """Validate and build a profile from a dict (a parsed TOML file or a manifest entry)."""
        data = dict(data)
        if data.get("tensorrt") is None:
            data.pop("tensorrt", None)
        return _parse(data, source)


# ----------------------------------------------------------------------------- validation


class _Checker:
    """Reads fields out of one table, raising errors that name the file and the field."""

    def __init__(self, source: str, table: dict[str, Any], prefix: str = ""):
        self.source, self.table, self.prefix = source, table, prefix

    def fail(self, key: str, problem: str) -> ProjectableEdgeError:
        return ProjectableEdgeError(f"{self.source}: field '{self.prefix}{key}' {problem}")

    def only(self, known: tuple[str, ...]) -> None:
        for key in self.table:
            if key not in known:
                raise self.fail(key, f"is not a known field (known: {', '.join(known)})")

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self.table:
            if default is ...:
                table = self.prefix.rstrip(".")
                line = f"a [{self.prefix}{key}] table" if kind is dict else \
                    f"{key} = ... " + (f"under [{table}]" if table else "above the first [table]")
                raise self.fail(key, f"is missing; add {line}, as in the shipped profiles in {profile_dir()}")
            return default
        value = self.table[key]
        if isinstance(value, bool) and kind is not bool:  # TOML true/false is not a number
            ok = False
        elif kind is float:
            ok = isinstance(value, (int, float))
            value = float(value) if ok else value
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise self.fail(key, f"must be {_TYPE_NAMES[kind]}, got {type(value).__name__} {value!r}")
        return value

    def positive(self, key: str, kind: type = int, minimum: int = 1) -> Any:
        """A number > 0 (float) or >= minimum (int)."""
        value = self.get(key, kind)
        if (not 0 < value < math.inf) if kind is float else (value < minimum):
            bound = "> 0" if kind is float else f">= {minimum}"
            raise self.fail(key, f"must be {bound}, got {value!r}")
        return value

    def text(self, key: str) -> str:
        value = self.get(key, str).strip()
        if not value:
            raise self.fail(key, "must not be empty")
        return value

    def choices(self, key: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        values = self.get(key, list)
        if not values:
            raise self.fail(key, f"must list at least one of: {', '.join(allowed)}")
        for v in values:
            if v not in allowed:
                raise self.fail(key, f"has unknown value {v!r} (allowed: {', '.join(allowed)})")
        if len(set(values)) != len(values):
            raise self.fail(key, f"lists a value twice: {values!r}")
        return tuple(values)

    def choice(self, key: str, allowed: tuple[str, ...]) -> str:
        value = self.get(key, str)
        if value not in allowed:
            raise self.fail(key, f"has unknown value {value!r} (allowed: {', '.join(allowed)})")
        return value

    def sub(self, key: str) -> _Checker:
        return _Checker(self.source, self.get(key, dict), f"{self.prefix}{key}.")


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "a table"}


def _name(c: _Checker, key: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):  # fullmatch: '$' alone allows a final newline
        raise c.fail(key, f"must be lower-case letters, digits, '.' or '-', got {value!r}")
    return value


def _shapes(c: _Checker, key: str) -> dict[str, int]:
    """Only the batch limit: sequence and cache lengths come from the model's block size."""
    s = c.sub(key)
    s.only(("batch",))
    return {"batch": s.positive("batch")}


def _parse_tensorrt(c: _Checker) -> TensorRTOptions:
    c.only(("fp16", "int8", "dla_core", "dla_cores", "workspace_mb",
            "min_shapes", "opt_shapes", "max_shapes"))
    dla_cores = c.get("dla_cores", int, 0)
    if dla_cores < 0:
        raise c.fail("dla_cores", f"must be >= 0, got {dla_cores}")
    dla_core = c.get("dla_core", int, -1)
    if not -1 <= dla_core < dla_cores:
        raise c.fail("dla_core", f"must be -1 (GPU only) or a DLA index below dla_cores={dla_cores}, "
                                 f"got {dla_core}")
    shapes = {k: _shapes(c, k) for k in ("min_shapes", "opt_shapes", "max_shapes")}
    lo, opt, hi = shapes["min_shapes"], shapes["opt_shapes"], shapes["max_shapes"]
    if lo["batch"] != 1:  # an engine refuses a batch below its minimum
        raise c.fail("min_shapes.batch", f"must be 1, got {lo['batch']}: the runtime scores single images and the "
                                         "last chunk of a split batch; set min_shapes = { batch = 1 }")
    for dim in lo:
        if not lo[dim] <= opt[dim] <= hi[dim]:
            raise c.fail(f"opt_shapes.{dim}", f"must satisfy min <= opt <= max, "
                                              f"got {lo[dim]} <= {opt[dim]} <= {hi[dim]}")
    return TensorRTOptions(fp16=c.get("fp16", bool), int8=c.get("int8", bool), dla_core=dla_core,
                           dla_cores=dla_cores, workspace_mb=c.positive("workspace_mb"),
                           min_shapes=lo, opt_shapes=opt, max_shapes=hi)


def _parse_performance(c: _Checker) -> Performance:
    c.only(("fp32_gflops", "fp16_gflops", "int8_gops", "memory_bandwidth_gbs", "source"))
    return Performance(fp32_gflops=c.positive("fp32_gflops", float), fp16_gflops=c.positive("fp16_gflops", float),
                       int8_gops=c.positive("int8_gops", float),
                       memory_bandwidth_gbs=c.positive("memory_bandwidth_gbs", float), source=c.text("source"))


def _parse(data: dict[str, Any], source: str) -> DeviceProfile:
    c = _Checker(source, data)
    c.only(("name", "aliases", "description", "arch", "memory_mb", "precisions", "compile_backend",
            "execution_providers", "threads", "software", "tensorrt", "budgets", "performance"))
    name = _name(c, "name", c.get("name", str))
    aliases = tuple(_name(c, "aliases", a) for a in c.get("aliases", list, []))
    for a in aliases:
        if (name, *aliases).count(a) > 1:
            raise c.fail("aliases", f"repeats {a!r} (the profile's name or another alias); drop the repeat")
    memory_mb = c.positive("memory_mb")
    precisions = c.choices("precisions", profile_precisions())
    backend = CompileBackend(c.choice("compile_backend", values(CompileBackend)))
    software = c.sub("software") if "software" in data else _Checker(source, {}, "software.")
    versions = {k: software.text(k) for k in software.table}

    trt = None
    if backend is CompileBackend.TENSORRT:
        if "tensorrt" not in data:
            raise c.fail("tensorrt", "is missing (required when compile_backend = \"tensorrt\"); add a [tensorrt] "
                                     "table (copy jetson-orin-nano.toml's) or set compile_backend = \"onnxruntime\"")
        if "tensorrt" not in versions:
            raise software.fail("tensorrt", "is missing (TensorRT engines are locked to the device's "
                                            "TensorRT version; record it, e.g. tensorrt = \"10.3\")")
        if not re.fullmatch(r"\d+(\.\d+){0,3}", versions["tensorrt"]):
            raise software.fail("tensorrt", f"must be a version like \"10.3\", got {versions['tensorrt']!r}")
        t = c.sub("tensorrt")
        trt = _parse_tensorrt(t)
        for p in ("fp16", "int8"):
            if p in precisions and not getattr(trt, p):
                raise t.fail(p, f"is false but precisions lists {p!r}; enable it or drop {p!r}")
        if trt.workspace_mb >= memory_mb:
            raise t.fail("workspace_mb", f"({trt.workspace_mb}) must be below memory_mb ({memory_mb})")
    elif "tensorrt" in data:
        raise c.fail("tensorrt", f"is only allowed with compile_backend = \"tensorrt\" (got {str(backend)!r})")

    b = c.sub("budgets")
    b.only(("p99_latency_ms", "memory_mb"))
    budgets = Budgets(p99_latency_ms=b.positive("p99_latency_ms", float),
                      memory_mb=b.positive("memory_mb"))
    if budgets.memory_mb > memory_mb:
        raise b.fail("memory_mb", f"({budgets.memory_mb}) exceeds the device's memory_mb ({memory_mb})")

    return DeviceProfile(
        performance=_parse_performance(c.sub("performance")) if "performance" in data else None,
        name=name, aliases=aliases, description=c.text("description"), arch=c.choice("arch", values(Arch)),
        memory_mb=memory_mb, precisions=precisions, compile_backend=backend,
        execution_providers=c.choices("execution_providers", EXECUTION_PROVIDERS),
        threads=c.positive("threads", int, minimum=0), software=versions, tensorrt=trt,
        budgets=budgets, source_file=source)


# ----------------------------------------------------------------------------- loading


def profile_dir() -> Path:
    """The directory holding the shipped profiles (this package's directory)."""
    return Path(__file__).resolve().parent


def _toml():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the host package depends on tomli there
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise ProjectableEdgeError("reading device profiles (TOML) on Python 3.10 needs tomli: "
                                       "pip install tomli (the runtime itself needs no TOML)") from None
    return tomllib


def _load_file(path: Path) -> DeviceProfile:
    tomllib = _toml()
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ProjectableEdgeError(f"{path}: device profile not found; check the path") from None
    except tomllib.TOMLDecodeError as e:
        if path.read_bytes().startswith(b"\xef\xbb\xbf"):  # what some Windows editors write first; TOML forbids it
            raise ProjectableEdgeError(f"{path}: starts with a byte-order mark (BOM), which TOML does not allow; "
                                       "save the profile as UTF-8 without BOM") from None
        raise ProjectableEdgeError(f"{path}: not valid TOML ({e}); fix the syntax") from None
    except UnicodeDecodeError as e:  # TOML is UTF-8; tomllib decodes the whole file first
        raise ProjectableEdgeError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                                   "save the profile as UTF-8") from None
    except OSError as e:
        raise ProjectableEdgeError(f"{path}: cannot read device profile ({e.strerror}); pass a readable .toml "
                                   "file") from None
    return _parse(data, str(path))


def list_profiles(directory: str | Path | None = None) -> list[DeviceProfile]:
    """Every profile in `directory` (default: the shipped ones), validated, sorted by name."""
    profiles: list[DeviceProfile] = []
    owner: dict[str, str] = {}  # name or alias -> file that claims it
    for path in sorted(Path(directory or profile_dir()).glob("*.toml")):
        p = _load_file(path)
        if p.name != path.stem:
            raise ProjectableEdgeError(f"{path}: field 'name' is {p.name!r} but the file is "
                                       f"{path.name}; name the file {p.name}.toml")
        for key in (p.name, *p.aliases):
            if key in owner:
                raise ProjectableEdgeError(f"device name or alias {key!r} is claimed by both "
                                           f"{owner[key]} and {path}; rename one")
            owner[key] = str(path)
        profiles.append(p)
    return sorted(profiles, key=lambda p: p.name)


def load_profile(name_or_path: str | Path, directory: str | Path | None = None) -> DeviceProfile:
    """A profile by name (`jetson-orin-nano`), alias (`jetson`) or path to a .toml file."""
    text = str(name_or_path).strip()
    path = Path(text).expanduser()
    if text.endswith(".toml") or "/" in text or "\\" in text:
        return _load_file(path)
    profiles = list_profiles(directory)
    for p in profiles:
        if text.lower() in (p.name, *p.aliases):
            return p
    known = ", ".join(p.name + (f" (alias {', '.join(p.aliases)})" if p.aliases else "")
                      for p in profiles)
    raise ProjectableEdgeError(
        f"unknown target device {text!r}; available: {known or 'none'}. To add a device, add a "
        f"TOML file to devices/ ({Path(directory or profile_dir())}) or pass a path to one.")
