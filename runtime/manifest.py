"""The bundle format: manifest.json schema, file hashing, and atomic bundle writing.

A bundle is a directory. `manifest.json` names every other file with its sha256 and
size, so the runtime can refuse a bundle that was corrupted or tampered with in
transit. The pipeline writes bundles with `staged_bundle` + `write_manifest`; the
runtime reads them with `read_manifest` + `verify_files`.

manifest.json (schema_version 1):
  schema_version  int; a runtime refuses a newer one
  task            {name, index}
  target          device profile dict (devices.DeviceProfile.to_dict())
  tokenizer       runtime.tokenizer.TokenizerSpec dict
  model           {n_layer, n_head, head_dim, vocab_size, block_size, bos_id}
  io              {graph kind: the graph's I/O spec} (informational; the runtime reads `model`)
  graphs          {variant: {"score": relpath, "decode": relpath | null}}
  selected        the variant chosen for the target
  engine          {status: built|deferred|not-applicable, path?, decode_path?, variant?,
                   command?, tensorrt_version?}
  goldens         relpath of goldens.npz (default "goldens.npz")
  files           {relpath: {sha256, bytes}} for every file but manifest.json
  accuracy        {reference_bits, tolerance, variants: {variant: {bits, delta, tolerance?}}}
  latency_host, tools, provenance   free-form dicts
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from devices.choices import StrEnum, values
from devices.errors import ProjectableEdgeError
from runtime.atomic import atomic_output
from runtime.graphs import GraphKind

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_GOLDENS = "goldens.npz"


class EngineStatus(StrEnum):
    BUILT = "built"  # a TensorRT engine is in the bundle
    DEFERRED = "deferred"  # build_engine.sh builds it on the device
    NOT_APPLICABLE = "not-applicable"  # the target runs ONNX Runtime


ENGINE_STATUSES = values(EngineStatus)
GRAPH_KEYS = tuple(k.key for k in GraphKind)  # {"score": path, "decode": path | null} per variant
REQUIRED_FIELDS = ("schema_version", "task", "target", "tokenizer", "model", "graphs", "selected",
                   "engine", "files", "accuracy")
OPTIONAL_DICTS = ("io", "latency_host", "tools", "provenance")
MODEL_FIELDS = ("n_layer", "n_head", "head_dim", "vocab_size", "block_size", "bos_id")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(bundle_dir: str | Path) -> dict[str, dict[str, Any]]:
    """{posix relpath: {sha256, bytes}} for every regular file except manifest.json."""
    root = Path(bundle_dir)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel == MANIFEST_NAME or not p.is_file():
            continue
        if p.is_symlink():
            raise ProjectableEdgeError(f"bundle file '{rel}' is a symlink; copy the real file into the bundle")
        out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


def _fail(bundle_dir: Path, what: str) -> ProjectableEdgeError:
    return ProjectableEdgeError(f"bundle {bundle_dir}: {what}")


def _relpath(bundle_dir: Path, field: str, value: Any) -> str:
    """A path inside the bundle: relative, no '..' (a manifest must not point outside it)."""
    if not isinstance(value, str) or not value:
        raise _fail(bundle_dir, f"manifest field '{field}' must be a relative path string, got {value!r}")
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or "\\" in value:
        raise _fail(bundle_dir, f"manifest field '{field}' = {value!r} points outside the bundle; "
                                "use a relative path inside the bundle directory")
    return p.as_posix()


def check_manifest(m: Any, bundle_dir: str | Path = "<manifest>") -> dict[str, Any]:
    """Validate structure and consistency; return the manifest with optional fields defaulted."""
    d = Path(bundle_dir)
    if not isinstance(m, dict):
        raise _fail(d, f"manifest.json must hold a JSON object, got {type(m).__name__}; regenerate the bundle")
    v = m.get("schema_version")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _fail(d, f"manifest field 'schema_version' must be a positive integer, got {v!r}")
    if v > SCHEMA_VERSION:
        raise _fail(d, f"manifest schema_version {v} is newer than this runtime supports "
                       f"({SCHEMA_VERSION}); upgrade the runtime (pip install -U projectable-edge)")
    missing = [f for f in REQUIRED_FIELDS if f not in m]
    if missing:
        raise _fail(d, f"manifest.json is missing field(s) {missing}; regenerate the bundle with "
                       "`projectable-edge generate`")
    m = dict(m)
    for f in OPTIONAL_DICTS:
        m.setdefault(f, {})
    m.setdefault("goldens", DEFAULT_GOLDENS)
    for f in ("task", "target", "tokenizer", "model", "graphs", "engine", "files", "accuracy",
              *OPTIONAL_DICTS):
        if not isinstance(m[f], dict):
            raise _fail(d, f"manifest field '{f}' must be an object, got {type(m[f]).__name__}")
    for f in MODEL_FIELDS:
        x = m["model"].get(f)
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise _fail(d, f"manifest field 'model.{f}' must be a positive integer, got {x!r}")
    if not m["graphs"]:
        raise _fail(d, "manifest field 'graphs' lists no graph variant; regenerate the bundle")
    for name, g in m["graphs"].items():
        if not isinstance(g, dict) or "score" not in g:
            raise _fail(d, f"manifest field 'graphs.{name}' must be {{\"score\": path, \"decode\": path|null}}")
        _relpath(d, f"graphs.{name}.score", g["score"])
        if g.get("decode") is not None:
            _relpath(d, f"graphs.{name}.decode", g["decode"])
    if m["selected"] not in m["graphs"]:
        raise _fail(d, f"manifest field 'selected' = {m['selected']!r} is not one of the graph variants "
                       f"{sorted(m['graphs'])}")
    status = m["engine"].get("status")
    if status not in ENGINE_STATUSES:
        raise _fail(d, f"manifest field 'engine.status' must be one of {list(ENGINE_STATUSES)}, got {status!r}")
    for key in ("path", "decode_path"):
        if m["engine"].get(key) is not None:
            _relpath(d, f"engine.{key}", m["engine"][key])
    if status == EngineStatus.BUILT and not m["engine"].get("path"):
        raise _fail(d, "manifest field 'engine.path' is required when engine.status is 'built'")
    _relpath(d, "goldens", m["goldens"])
    for rel, entry in m["files"].items():
        _relpath(d, f"files[{rel!r}]", rel)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int)):
            raise _fail(d, f"manifest field 'files[{rel!r}]' must be {{\"sha256\": hex, \"bytes\": int}}")
    return m


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    d = Path(bundle_dir)
    if not d.is_dir():
        raise ProjectableEdgeError(f"bundle directory '{d}' does not exist; pass the folder "
                                   "`projectable-edge generate` wrote (bundles/<task>__<target>)")
    path = d / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(d, f"has no {MANIFEST_NAME}; it is not a bundle or was copied incompletely — "
                       "copy the whole bundle directory again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(d, f"cannot read {MANIFEST_NAME} ({e}); copy the bundle again") from None
    try:
        m = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(d, f"{MANIFEST_NAME} is not valid JSON ({e}); the file is corrupt, copy the "
                       "bundle again") from None
    return check_manifest(m, d)


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Check every listed file's size and sha256, and that every referenced file is listed."""
    d = Path(bundle_dir)
    files = manifest["files"]
    referenced = [g[k] for g in manifest["graphs"].values() for k in GRAPH_KEYS if g.get(k)]
    if manifest["engine"].get("status") == EngineStatus.BUILT:
        referenced += [manifest["engine"][k] for k in ("path", "decode_path") if manifest["engine"].get(k)]
    for rel in referenced:
        if rel not in files:
            raise _fail(d, f"file '{rel}' is used by the manifest but has no hash in 'files'; "
                           "regenerate the bundle (write_manifest hashes every file)")
    for rel, entry in files.items():
        p = d / rel
        if not p.is_file():
            raise _fail(d, f"file '{rel}' listed in the manifest is missing; copy the whole bundle again")
        size = p.stat().st_size
        if size != entry["bytes"]:
            raise _fail(d, f"file '{rel}' has {size} bytes, the manifest says {entry['bytes']}; it is "
                           "truncated or modified — copy the bundle again or regenerate it")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise _fail(d, f"file '{rel}' does not match its sha256 in the manifest (got {digest[:12]}…, "
                           f"expected {entry['sha256'][:12]}…); it is corrupt or was modified — copy the "
                           "bundle again or regenerate it")


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Hash every file in the folder into `files`, validate, write manifest.json; return it."""
    d = Path(bundle_dir)
    m = dict(manifest)
    m.setdefault("schema_version", SCHEMA_VERSION)
    m["files"] = hash_files(d)
    m = check_manifest(m, d)
    needed = [g[k] for g in m["graphs"].values() for k in GRAPH_KEYS if g.get(k)] + [m["goldens"]]
    for rel in needed:
        if rel not in m["files"]:
            raise _fail(d, f"file '{rel}' named in the manifest is not in the bundle; write it before "
                           "write_manifest")
    with atomic_output(d / MANIFEST_NAME, overwrite=True) as tmp:
        tmp.write_text(json.dumps(m, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return m


@contextlib.contextmanager
def staged_bundle(dest: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `dest`; on success (with a manifest written) it becomes `dest`.

    Nothing half-written is ever visible at `dest`. With overwrite=True an existing bundle is
    replaced (moved aside, then deleted after the rename succeeds).
    """
    with atomic_output(dest, directory=True, overwrite=overwrite, what="bundle") as tmp:
        yield tmp
        if not (tmp / MANIFEST_NAME).is_file():
            raise ProjectableEdgeError(f"bundle staged for '{dest}' has no {MANIFEST_NAME}; call "
                                       "write_manifest() inside the staged_bundle block")
