"""The bundle format, described once: these frozen dataclasses ARE manifest.json. The checks (`parse`), the
writer (`to_json`), the JSON Schema and docs/manifest.md's field tables all derive from them and their `doc(...)`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterator, Union

from .atomic import atomic_output
from ..devices.choices import StrEnum
from ..devices.errors import ProjectableEdgeError
from ..devices.profiles import DeviceProfile
from ..graphs.tokenizer import TokenizerSpec

SCHEMA_VERSION = 4  # 4: one typed `candidates` table for every bundle; references from PyTorch
MANIFEST_NAME = "manifest.json"
CANONICAL = "json: sorted keys, separators (',', ':'), UTF-8, without the 'integrity' field"
ENGINE_RECORD_SUFFIX = ".record.json"  # a device-built engine's own record, next to its plan

RelPath = Annotated[str, "relpath"]  # a path inside the bundle: relative, no '..'
# [\s\S], not '.': a schema validator's '.' stops at a newline
RELPATH_PATTERN = r"^(?!/)(?!([\s\S]*/)?\.\.(/|$))[^\\]+$"
Count = Annotated[int, "positive"]
Index = Annotated[int, "nonnegative"]
Amount = Annotated[float, "nonnegative"]


def doc(text: str, default: Any = dataclasses.MISSING, **meta) -> Any:
    """A dataclass field with its documentation (the schema's description and the docs' table)."""
    kw = {"default_factory": default} if isinstance(default, type) else {"default": default}
    return field(metadata={"doc": text, **meta}, **({} if default is dataclasses.MISSING else kw))


class EngineStatus(StrEnum):
    BUILT = "built"  # a TensorRT engine built on the host is in the bundle
    DEFERRED = "deferred"  # build_engine.sh builds it on the device
    NOT_APPLICABLE = "not-applicable"  # the target runs ONNX Runtime


@dataclass(frozen=True)
class Task:
    name: str = doc("The task's folder or class name, or the name given to `adapt`.")
    index: Index | None = doc("Its index in the source run; null for a task added by `adapt`.")


@dataclass(frozen=True)
class ModelFacts:
    n_layer: Count = doc("Transformer blocks (KV-cache shape).")
    n_head: Count = doc("Attention heads (KV-cache shape).")
    head_dim: Count = doc("Width of one head (KV-cache shape).")
    vocab_size: Count = doc("Token ids are 0..vocab_size-1 (the tokenizer's levels).")
    block_size: Count = doc("Longest sequence, in tokens.")
    bos_id: Count = doc("The start token fed first when sampling.")
    d_model: Count = doc("Residual width (informational).")
    params: Count = doc("Parameters of the deployable model, task vector included (informational).")


@dataclass(frozen=True)
class Graphs:
    score: RelPath = doc("The scoring graph: tokens [N, T] -> logits [N, T, V], where logits[:, t] "
                         "scores tokens[:, t] given those before it (BOS is inside the graph).")
    decode: RelPath | None = doc("The KV-cache decode graph (one step), or null: sampling then recomputes.")


@dataclass(frozen=True)
class Accuracy:
    reference_bits: Amount = doc("The fp32 PyTorch model's bits/dim on the goldens: what every machine validates "
                                "against (`validate`, `tune`, a device-built engine's test inference).")
    tolerance: Amount = doc("Largest |measured - reference_bits| (bits/dim) a machine accepts for this candidate.")
    tolerance_rel: Amount = doc("The same, relative: the variant's accuracy budget plus the device drift (registry).")
    within_budget: bool = doc("Quantization acceptance: within the variant's budget vs fp32 on the task's "
                              "validation split (fp32: true).")
    bits: float | None = doc("Bits/dim of the scoring graph on the goldens, ONNX Runtime on the build host.")
    passed: bool | None = doc("The build host's validation against reference_bits.")
    vs_fp32: float | None = doc("bits - the same size's fp32 bits (goldens, build host).")
    universal_bits: float | None = doc("The same-size universal model's bits/dim on the goldens (PyTorch; ladder).",
                                       None)
    vs_universal: float | None = doc("bits - universal_bits (negative: the projected candidate is better).", None)
    quantization: dict | None = doc("Informational: the quantization report on the validation split (bits vs fp32 "
                                    "and PyTorch, budget, layers left in float, calibration set sha256).", None)


@dataclass(frozen=True)
class HostLatency:
    p50_ms: float = doc("Median latency of scoring one golden image on the build host.")
    p99_ms: float = doc("Its 99th percentile.")
    peak_rss_mb: float | None = doc("Peak resident memory of the measuring runtime process.")
    results: dict = doc("Every case measured (`score_batch1`, and for the main size `score_batch16`, "
                        "`sample_full_image`): runs, percentiles, mean, std, throughput.")


@dataclass(frozen=True)
class Candidate:
    size: str = doc("The small size, WIDTHxLAYERS.")
    variant: str = doc("The graph variant (a name of the variant registry: fp32, fp16, int8-static, ...).")
    main: bool = doc("The run's main size: a TensorRT engine built for the selected variant applies to it.")
    role: str = doc("The run's role it was projected from (`projected`, or `projected@SIZE` for a ladder size).")
    model: ModelFacts = doc("What the runtime needs to feed its graphs.")
    graphs: Graphs = doc("Its graphs.")
    goldens: RelPath = doc("Held-out task sequences (`tokens`, from the test split) with the fp32 PyTorch "
                           "model's bits/dim per image (`ref_bits`).")
    accuracy: Accuracy = doc("Accuracy on the goldens.")
    cost: dict | None = doc("`flops_per_image`, `bytes_per_image` of scoring one image (informational).", None)
    latency_host: HostLatency | None = doc("Measured on the build host, one runtime process per candidate.", None)
    estimate: dict | None = doc("An ESTIMATE of device latency (`label`: estimate): `device_p50_ms`, "
                                "`host_p50_ms`, `host_measured_p50_ms`, `error_ratio` (leave-one-out).", None)


@dataclass(frozen=True)
class Selection:
    rule: str = doc("How the target's variant is chosen (and whether host timings may pass one over).")
    reason: str = doc("Why `selected` won.")
    passed_over: dict[str, str] = doc("{candidate: why it was not selected}.")


@dataclass(frozen=True)
class Engine:
    status: EngineStatus = doc("`built` (in the bundle), `deferred` (build_engine.sh builds it on the device) or "
                               "`not-applicable` (the target runs ONNX Runtime).")
    reason: str = doc("Why that status.")
    variant: str | None = doc("The variant it is built from.", None)
    path: RelPath | None = doc("The scoring plan (built or to be built).", None)
    decode_path: RelPath | None = doc("The decode plan.", None)
    command: str | None = doc("How to build on the device: `bash build_engine.sh`, from anywhere.", None)
    trtexec: str | None = doc("The exact trtexec command of the scoring plan, run in its folder (engine/).", None)
    trtexec_decode: str | None = doc("The exact trtexec command of the decode plan, run in its folder.", None)
    tensorrt_version: str | None = doc("TensorRT of a host-built engine, else the profile's.", None)
    tensorrt_version_source: str | None = doc("Where tensorrt_version comes from.", None)
    typing: str | None = doc("`strong` (QDQ graph, TensorRT >= 10: --stronglyTyped) or `weak`.", None)
    shapes: dict | None = doc("Optimization profiles {score|decode: {min|opt|max: {input: shape}}}: batch from "
                              "the profile, lengths from the model's block size.", None)
    records: dict[str, str] | None = doc("{plan: record}: where build_engine.sh writes each plan's record.", None)
    trt_check: dict | None = doc("The static TensorRT check per graph (informational).", None)
    ort: dict | None = doc("ONNX Runtime targets: the offline-optimized and .ort files per graph (the optimized "
                           "decode graph holds one cache per layer, `past_kv_<i>` -> `present_kv_<i>`; the decode "
                           ".ort keeps the exported `past_keys`/`past_values`, portable to minimal builds).", None)


@dataclass(frozen=True)
class Requires:
    python: str = doc("Python floor, `>=X.Y`.")
    onnxruntime: str = doc("onnxruntime floor; `load` checks it before any session.")
    numpy: str = doc("numpy floor.")
    onnxruntime_reason: str = doc("Why that onnxruntime floor.")
    onnx_ir_version: int | None = doc("The graphs' ONNX IR version.", None)
    opsets: dict[str, int] = doc("The graphs' opset imports.", dict)


@dataclass(frozen=True)
class Wheel:
    path: RelPath = doc("The runtime-only wheel inside the bundle.")
    distribution: str = doc("Its distribution name.")
    version: str = doc("Its version.")
    import_name: str = doc("Its import name.")
    requires: tuple[str, ...] = doc("Its dependencies (numpy, onnxruntime).")
    extras: dict[str, tuple[str, ...]] = doc("Optional extras (`images`: Pillow).")
    install: str = doc("The device's install command, typed in the bundle folder (the venv goes beside it).")
    run: str = doc("The device's first command, typed in the bundle folder.")


@dataclass(frozen=True)
class Ladder:
    sizes: tuple[str, ...] = doc("The sizes, main size first.")
    order: str = doc("How `candidates` are ordered.")
    estimate: dict = doc("The device-latency estimate: `label`, `method`, `calibration`, `device_peaks`, "
                         "`host_peaks`, `error_ratio_range` (out of sample).")
    host_pick: dict = doc("What `tune` picks from the build host's measurements against the target's budgets "
                          "(`choice`, `fits`, `closest`, `explanation`, `budget`, `note`): the device's is tune's.")


@dataclass(frozen=True)
class Exercised:
    done: tuple[str, ...] = doc("What the build host really ran.")
    not_done: tuple[str, ...] = doc("What it could not (e.g. the TensorRT build, device latency).")


@dataclass(frozen=True)
class FileEntry:
    sha256: str = doc("Its sha256.")
    bytes: int = doc("Its size.")
    optional: bool = doc("It may be deleted (the report and its figures); if present it must match.", False)


@dataclass(frozen=True)
class Integrity:
    algorithm: str = doc("`sha256`.", schema={"const": "sha256"})
    canonical: str = doc("How the canonical form is made.")
    manifest_sha256: str = doc("sha256 of the canonical manifest (every field but `integrity`).")
    signature: dict | None = doc("Optional Ed25519 signature of the digest: `algorithm`, `key_id`, `value`.", None)


@dataclass(frozen=True)
class Manifest:
    schema_version: int = doc("Format version; a runtime reads its own and refuses others.",
                              schema={"const": SCHEMA_VERSION})
    task: Task = doc("The task.")
    target: DeviceProfile = doc("The device profile the bundle was built for (devices/NAME.toml as JSON).")
    tokenizer: TokenizerSpec = doc("How images become tokens.")
    candidates: dict[str, Candidate] = doc("Every (size, variant) the bundle holds, named SIZE/VARIANT; the main "
                                           "size's first, in the target's preference order.",
                                           schema={"minProperties": 1})
    selected: str = doc("The candidate `load()` opens by default (neither precision, candidate nor tuned record).")
    selection: Selection = doc("How `selected` was chosen.")
    engine: Engine = doc("The compiled engine.")
    requires: Requires = doc("What the device needs.")
    task_test_bits: dict[str, float] = doc("This task's bits/dim on its whole test split (PyTorch): the projected "
                                           "model, and the other roles when generate was asked for them.")
    runtime_wheel: Wheel | None = doc("The runtime wheel the bundle carries.", None)
    ladder: Ladder | None = doc("Only in `generate --ladder` bundles.", None)
    io: dict = doc("Informational: each graph kind's exported I/O spec.", dict)
    tools: dict[str, str] = doc("Informational: tool versions used to build the bundle.", dict)
    provenance: dict = doc("Informational: source run, its config and weights sha256, projection time, "
                           "generate settings, step summaries, step-cache hits, generate seconds.", dict)
    exercised: Exercised | None = doc("What the host ran and what it could not.", None)
    files: dict[RelPath, FileEntry] = doc("{path: entry} for every file but manifest.json.", dict, required=True)
    integrity: Integrity | None = doc("The seal (null only while generate builds the manifest).", None,
                                      required=True, schema={"not": {"type": "null"}})

    def candidate(self, name: str) -> Candidate:
        if name in self.candidates:
            return self.candidates[name]
        raise ProjectableEdgeError(f"unknown candidate {name!r}; this bundle has: {', '.join(self.candidates)} "
                                   "(SIZE/VARIANT; `python -m projectable_edge_runtime info BUNDLE --json` lists them)")

    def main_candidates(self) -> dict[str, Candidate]:
        return {n: c for n, c in self.candidates.items() if c.main}


# ----------------------------------------------------------------------------- the codec


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _fields(cls):
    return [f for f in dataclasses.fields(cls) if f.metadata.get("json", True)]


def _unwrap(tp) -> tuple[Any, str | None]:
    if typing.get_origin(tp) is Annotated:
        return tp.__origin__, tp.__metadata__[0]
    return tp, None


def _optional(tp) -> Any:
    """The T of `T | None`, else None."""
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else None
    return None


_MINIMUM = {"positive": (1, "a positive integer"), "nonnegative": (0, "a number >= 0")}
_SCALARS = {bool: ("true or false", bool), str: ("a string", str), int: ("an integer", int),
            float: ("a number", (int, float))}


def _bad(where: str, want: str, value: Any) -> ProjectableEdgeError:
    return ProjectableEdgeError(f"manifest field '{where}' must be {want}, got {value!r}")


def decode(tp, value: Any, where: str) -> Any:
    """A JSON value as `tp` (a dataclass, dict/tuple of them, a scalar); an error names the field."""
    tp, tag = _unwrap(tp)
    if (inner := _optional(tp)) is not None:
        return None if value is None else decode(inner, value, where)
    origin = typing.get_origin(tp)
    if (dataclasses.is_dataclass(tp) or dict in (tp, origin)) and not isinstance(value, dict):
        raise _bad(where, "an object", value)
    if dataclasses.is_dataclass(tp):
        if hasattr(tp, "from_dict"):  # device profile, tokenizer spec: their own checks
            return tp.from_dict(value, **({"source": f"manifest field '{where}'"} if tp is DeviceProfile else {}))
        hints, kw = _hints(tp), {}
        for f in _fields(tp):
            if f.name in value:
                kw[f.name] = decode(hints[f.name], value[f.name], f"{where}.{f.name}" if where else f.name)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProjectableEdgeError(f"manifest.json is missing field '{where + '.' if where else ''}{f.name}'; "
                                           "regenerate the bundle with `projectable-edge generate`")
        return tp(**kw)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return {decode(kt, k, f"{where} key"): decode(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list):
            raise _bad(where, "a list", value)
        return tuple(decode(typing.get_args(tp)[0], v, f"{where}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and issubclass(tp, Enum):
        if value not in [m.value for m in tp]:
            raise _bad(where, f"one of {[m.value for m in tp]}", value)
        return tp(value)
    if tp is dict:
        return value
    want, accepted = _SCALARS[tp]
    if not isinstance(value, accepted) or (isinstance(value, bool) and tp is not bool):
        raise _bad(where, want, value)
    if tag in _MINIMUM and value < _MINIMUM[tag][0]:
        raise _bad(where, _MINIMUM[tag][1], value)
    if tag == "relpath" and not re.match(RELPATH_PATTERN, value, re.DOTALL):
        raise ProjectableEdgeError(f"manifest field '{where}' = {value!r} points outside the bundle; use a "
                                   "relative path inside the bundle directory")
    return float(value) if tp is float else value


def to_json(obj: Any) -> Any:
    """A dataclass tree as JSON-ready values (what a reader will parse: str keys, lists)."""
    if dataclasses.is_dataclass(obj):
        if hasattr(obj, "to_dict"):
            return obj.to_dict()
        return {f.name: to_json(getattr(obj, f.name)) for f in _fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    return obj


def _schema(tp, closed: bool = False) -> dict:
    """closed: unknown fields are refused (a class with its own `from_dict`, and what it holds, checks them)."""
    tp, tag = _unwrap(tp)
    if (inner := _optional(tp)) is not None:
        return {"anyOf": [_schema(inner, closed), {"type": "null"}]}
    if dataclasses.is_dataclass(tp):
        closed = closed or hasattr(tp, "from_dict")
        hints = _hints(tp)
        props = {f.name: {**_schema(hints[f.name], closed), **f.metadata.get("schema", {}),
                          "description": f.metadata.get("doc", "")} for f in _fields(tp)}
        required = [f.name for f in _fields(tp) if f.metadata.get("required")
                    or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)]
        return {"type": "object", "required": required, "properties": props,
                **({"additionalProperties": False} if closed else {})}
    origin = typing.get_origin(tp)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        return {"type": "object", "additionalProperties": _schema(vt, closed),
                **({"propertyNames": _schema(kt)} if _unwrap(kt)[1] else {})}
    if origin is tuple:
        return {"type": "array", "items": _schema(typing.get_args(tp)[0], closed)}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return {"enum": [m.value for m in tp]}
    extra = ({"minimum": _MINIMUM[tag][0]} if tag in _MINIMUM
             else {"pattern": RELPATH_PATTERN} if tag == "relpath" else {})
    return {"type": {dict: "object", bool: "boolean", str: "string", int: "integer", float: "number"}[tp], **extra}


def json_schema() -> dict:
    """The JSON Schema of manifest.json, derived from the dataclasses (the one description)."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "projectable-edge bundle manifest",
            **_schema(Manifest)}


# ----------------------------------------------------------------------------- files and integrity


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def walk_bundle(root: Path) -> list[str]:
    """Sorted posix relpaths of the regular files under root; a symlink (file or folder) or a special
    file is an error naming it (os.walk never follows links, so nothing outside is ever read)."""
    def unreadable(e: OSError):  # os.walk skips a folder it cannot list: its files would look missing
        raise _unreadable(root, e)

    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                raise _fail(root, f"'{rel}' is a symlink; a bundle must hold real files (no links) — copy "
                                  "the file itself into the bundle, or copy the bundle again without links")
            if name in filenames:
                if not p.is_file():
                    raise _fail(root, f"'{rel}' is not a regular file; remove it")
                found.append(rel)
    return sorted(found)


def file_info(path: str | os.PathLike) -> dict[str, Any]:
    """{'sha256', 'bytes'} of a file, as `files` records it."""
    return {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}


def _fail(bundle_dir: Path, what: str) -> ProjectableEdgeError:
    return ProjectableEdgeError(f"bundle {bundle_dir}: {what}")


def _unreadable(bundle_dir: Path, e: OSError) -> ProjectableEdgeError:
    """A file or folder of the bundle that this user may not read (a copy that kept another user's modes)."""
    name = os.path.relpath(e.filename, bundle_dir) if e.filename else "a file"
    return _fail(bundle_dir, f"cannot read '{Path(name).as_posix()}' ({e.strerror}); give this user read access to "
                             f"the bundle (`chmod -R a+rX {bundle_dir}`) or copy it again as this user")


def manifest_digest(m: dict[str, Any]) -> str:
    """sha256 of what the digest (and signature) cover: every field but `integrity`, canonically (CANONICAL)."""
    body = json.dumps({k: v for k, v in m.items() if k != "integrity"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def seal(m: dict[str, Any], sign_key: Any = None) -> dict[str, Any]:
    """m (JSON) with a fresh `integrity`: its canonical digest, signed with sign_key when given."""
    m = {k: v for k, v in m.items() if k != "integrity"}
    digest = manifest_digest(m)
    integrity: dict[str, Any] = {"algorithm": "sha256", "canonical": CANONICAL, "manifest_sha256": digest}
    if sign_key is not None:
        from .signing import sign_digest  # lazy: cryptography only when signing

        integrity["signature"] = sign_digest(sign_key, digest)
    return {**m, "integrity": integrity}


def _finite(value: Any, where: str) -> None:
    """Every number in the JSON finite, every integer an int64: NaN, Infinity and 1e400 are no data."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(where, "a finite number", value)
    if isinstance(value, int) and not -2**63 <= value < 2**63:
        raise ProjectableEdgeError(f"manifest field '{where}' must be an integer within int64, got one of "
                                   f"{value.bit_length()} bits")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        _finite(v, f"{where}[{k}]" if isinstance(value, list) else f"{where}.{k}" if where else k)


def parse(raw: Any, bundle_dir: str | Path = "<manifest>") -> Manifest:
    """Check a manifest's JSON against the format and its consistency; the typed Manifest."""
    d = Path(bundle_dir)
    if not isinstance(raw, dict):
        raise _fail(d, f"manifest.json must hold a JSON object, got {type(raw).__name__}; regenerate the bundle")
    v = raw.get("schema_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(d, f"manifest field 'schema_version' must be a positive integer, got {v!r}")
    if v > SCHEMA_VERSION:
        raise _fail(d, f"manifest schema_version {v} is newer than this runtime supports ({SCHEMA_VERSION}); "
                       "upgrade the runtime (pip install -U projectable-edge, or the wheel inside the bundle)")
    if v < SCHEMA_VERSION:
        raise _fail(d, f"manifest schema_version {v} was written by an older projectable-edge; this runtime reads "
                       f"{SCHEMA_VERSION}: regenerate the bundle, or install the runtime wheel inside it "
                       "(BUNDLE/runtime/*.whl)")
    try:
        _finite(raw, "")
        m = decode(Manifest, raw, "")
    except ProjectableEdgeError as e:
        raise _fail(d, str(e)) from None
    if not m.candidates:
        raise _fail(d, "manifest field 'candidates' lists no candidate; regenerate the bundle")
    m.candidate(m.selected)
    for name, c in m.candidates.items():
        if c.model.vocab_size != m.tokenizer.vocab_size:
            raise _fail(d, f"candidates.{name}.model.vocab_size {c.model.vocab_size} != tokenizer levels "
                           f"{m.tokenizer.vocab_size}; the bundle is inconsistent, regenerate it")
        if c.model.bos_id > c.model.vocab_size:  # the start token is the embedding's extra row, vocab_size
            raise _fail(d, f"candidates.{name}.model.bos_id {c.model.bos_id} is beyond the vocabulary (token ids "
                           f"0..{c.model.vocab_size - 1}, the start token at most {c.model.vocab_size}); "
                           "regenerate the bundle")
        if m.tokenizer.seq_len > c.model.block_size:
            raise _fail(d, f"images have {m.tokenizer.seq_len} tokens but candidates.{name}.model.block_size is "
                           f"{c.model.block_size}; regenerate the bundle")
    if m.engine.status == EngineStatus.BUILT and not m.engine.path:
        raise _fail(d, "manifest field 'engine.path' is required when engine.status is 'built'")
    return m


def engine_plans(m: Manifest, status: EngineStatus) -> list[str]:
    """The engine's plans if its status is `status` (DEFERRED: build_engine.sh adds them after the manifest)."""
    return [p for p in (m.engine.path, m.engine.decode_path) if p] if m.engine.status == status else []


def used_files(m: Manifest) -> list[str]:
    """Every file the manifest runs from: each candidate's graphs and goldens (and a host-built engine)."""
    out = [p for c in m.candidates.values() for p in (c.graphs.score, c.graphs.decode, c.goldens) if p]
    return list(dict.fromkeys(out + engine_plans(m, EngineStatus.BUILT)))


def read_manifest(bundle_dir: str | Path, public_key: Any = None) -> Manifest:
    """Parse and check manifest.json, and verify it is what was written: its digest (and signature, given a key)."""
    fix = "pass the folder `projectable-edge generate` wrote (bundles/<task>__<target>)"
    if not isinstance(bundle_dir, (str, os.PathLike)):
        raise ProjectableEdgeError(f"the bundle must be a folder path (str or pathlib.Path), got "
                                   f"{type(bundle_dir).__name__} {str(bundle_dir)[:80]!r}; {fix}")
    if bundle_dir == "":  # Path("") is the current folder
        raise ProjectableEdgeError(f"the bundle path is empty; {fix}")
    d = Path(bundle_dir)
    if not d.is_dir():
        raise ProjectableEdgeError(f"bundle directory '{d}' {'is a file' if d.exists() else 'does not exist'}; {fix}")
    path = d / MANIFEST_NAME
    try:
        if path.is_symlink():
            raise _fail(d, f"'{MANIFEST_NAME}' is a symlink; a bundle must hold real files — copy the bundle again")
        if path.exists() and not path.is_file():  # a folder, or a FIFO that would block the read
            raise _fail(d, f"'{MANIFEST_NAME}' is not a regular file; copy the bundle again")
        raw = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError as e:
        raise _unreadable(d, e) from None
    except FileNotFoundError:
        raise _fail(d, f"has no {MANIFEST_NAME}; it is not a bundle or was copied incompletely — "
                       "copy the whole bundle directory again") from None
    except (OSError, ValueError, RecursionError) as e:  # ValueError: not UTF-8, or not valid JSON
        why = "nested too deeply" if isinstance(e, RecursionError) else e
        raise _fail(d, f"{MANIFEST_NAME} is unreadable or not valid JSON ({why}); copy the bundle again") from None
    if not isinstance(raw, dict):
        return parse(raw, d)  # refuses it, naming what the file holds
    integ = raw.get("integrity")  # the seal first: an edited manifest is named as edited, whatever it now holds
    if not isinstance(integ, dict) or not isinstance(integ.get("manifest_sha256"), str):
        raise _fail(d, f"{MANIFEST_NAME} has no valid 'integrity.manifest_sha256' digest; regenerate the bundle")
    if integ.get("algorithm", "sha256") != "sha256":
        raise _fail(d, f"{MANIFEST_NAME}: unknown integrity algorithm {integ.get('algorithm')!r}; upgrade the runtime")
    digest = manifest_digest(raw)
    if digest != integ["manifest_sha256"]:
        raise _fail(d, f"{MANIFEST_NAME} was edited after the bundle was written (its canonical sha256 "
                       f"{digest[:12]}… differs from integrity.manifest_sha256 {integ['manifest_sha256'][:12]}…); "
                       "copy the bundle again or regenerate it")
    if public_key is not None:
        from .signing import verify_signature  # lazy: cryptography only when a key is given

        verify_signature(public_key, digest, integ.get("signature"), f"bundle {d}: {MANIFEST_NAME}")
    return parse(raw, d)


def _check_entry(d: Path, rel: str, entry: FileEntry, what: str) -> None:
    size = (d / rel).stat().st_size
    if size != entry.bytes:
        raise _fail(d, f"file '{rel}' has {size} bytes, {what} says {entry.bytes}; it is truncated or modified — "
                       "copy the bundle again or regenerate it")
    try:
        digest = sha256_file(d / rel)
    except PermissionError as e:
        raise _unreadable(d, e) from None
    if digest != entry.sha256:
        raise _fail(d, f"file '{rel}' does not match its sha256 in {what} (got {digest[:12]}…, expected "
                       f"{entry.sha256[:12]}…); it is corrupt or was modified — copy the bundle again or regenerate it")


def read_engine_record(d: Path, plan_rel: str, present: set[str]) -> dict[str, Any]:
    """A device-built engine's record, checked: it names the plan and every file the build wrote, with
    their sha256 and size; those files may then sit in the bundle unlisted by the manifest."""
    rec_rel = plan_rel + ENGINE_RECORD_SUFFIX
    rebuild = f"rebuild with `bash {d}/build_engine.sh`"
    if rec_rel not in present:
        raise _fail(d, f"file '{plan_rel}' is not listed in the manifest and has no engine record '{rec_rel}'; "
                       f"{rebuild} (which writes the record) or delete it")
    try:
        rec = json.loads((d / rec_rel).read_text(encoding="utf-8"))
        files = decode(dict[RelPath, FileEntry], rec["files"], f"{rec_rel} files")
        version = rec.get("tensorrt_version")  # the runtime checks it against the device's TensorRT
        ok = isinstance(version, str) and version.strip() and plan_rel in files \
            and isinstance(rec.get("test_inference", {}), dict)
    except (OSError, ValueError, ProjectableEdgeError, KeyError, TypeError) as e:
        raise _fail(d, f"engine record '{rec_rel}' is unreadable ({e}); {rebuild}") from None
    if not ok:
        raise _fail(d, f"engine record '{rec_rel}' must hold tensorrt_version (a version), files{{'{plan_rel}': "
                       f"{{sha256, bytes}}}} and test_inference (an object); {rebuild}")
    for rel, entry in files.items():
        if rel not in present:
            raise _fail(d, f"file '{rel}' named by engine record '{rec_rel}' is missing; {rebuild}")
        _check_entry(d, rel, entry, f"engine record '{rec_rel}'")
    return rec


def os_clutter(rel: str) -> bool:
    """What file managers leave in a copied folder (Finder, macOS on FAT/exFAT sticks: `._*`; Windows Explorer):
    never read, so not a bundle file to refuse."""
    name = rel.rsplit("/", 1)[-1]
    return name in (".DS_Store", "Thumbs.db", "desktop.ini") or name.startswith("._")


def verify_files(bundle_dir: str | Path, m: Manifest) -> dict[str, dict[str, Any]]:
    """Check the folder against the manifest (sizes, sha256, nothing missing, unlisted or a symlink, except a
    device-built engine with its own record, checked too); returns the device-built engines' records."""
    d = Path(bundle_dir)
    for rel in used_files(m):
        if rel not in m.files:
            raise _fail(d, f"file '{rel}' is used by the manifest but has no hash in 'files'; "
                           "regenerate the bundle (write_manifest hashes every file)")
        if m.files[rel].optional:
            raise _fail(d, f"file '{rel}' is needed to run the bundle but marked optional; regenerate the bundle")
    present = set(walk_bundle(d)) - {MANIFEST_NAME}
    for rel, entry in m.files.items():
        if rel in present:
            _check_entry(d, rel, entry, "the manifest")
        elif not entry.optional:
            raise _fail(d, f"file '{rel}' listed in the manifest is missing; copy the whole bundle again")
    records: dict[str, dict[str, Any]] = {}
    allowed = set(m.files)
    for plan in engine_plans(m, EngineStatus.DEFERRED):
        if plan in present and plan not in m.files:
            records[plan] = read_engine_record(d, plan, present)
            allowed |= set(records[plan]["files"]) | {plan + ENGINE_RECORD_SUFFIX}
    extra = sorted(p for p in present - allowed if not os_clutter(p))
    if extra:
        nor = f" (nor {extra[1:6]}{f' and {len(extra) - 6} more' if extra[6:] else ''})" if extra[1:] else ""
        raise _fail(d, f"file '{extra[0]}' is not listed in the manifest{nor}"
                    + "; a bundle holds only what generate wrote (and device-built engines with their record) "
                      "— delete it or regenerate the bundle")
    return records


def write_manifest(bundle_dir: str | Path, manifest: Manifest | dict, optional: tuple[str, ...] = (),
                   sign_key: Any = None) -> Manifest:
    """Hash every file in the folder into `files` (marking `optional` ones), check, seal (digest, and an
    Ed25519 signature with sign_key), write manifest.json once; return the written manifest."""
    d = Path(bundle_dir)
    body = to_json(manifest) if isinstance(manifest, Manifest) else dict(manifest)
    files = {rel: {**file_info(d / rel), "optional": rel in optional} for rel in walk_bundle(d) if rel != MANIFEST_NAME}
    body = {**body, "schema_version": body.get("schema_version", SCHEMA_VERSION), "files": files}
    raw = seal(body, sign_key)
    m = parse(raw, d)
    for rel in used_files(m):
        if rel not in m.files:
            raise _fail(d, f"file '{rel}' named in the manifest is not in the bundle; write it before write_manifest")
    with atomic_output(d / MANIFEST_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
    return m


@contextlib.contextmanager
def staged_bundle(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `dest` that becomes `dest` once its manifest is written: nothing half-written
    is ever visible there (see atomic_output)."""
    with atomic_output(dest, directory=True, overwrite=overwrite, what="bundle", mark=MANIFEST_NAME) as tmp:
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise ProjectableEdgeError(f"bundle staged for '{dest}' has no {MANIFEST_NAME}; call "
                                       "write_manifest() inside the staged_bundle block")
