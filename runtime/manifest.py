"""The bundle format: manifest.json schema, file hashing, and atomic bundle writing.

A bundle is a directory. `manifest.json` names every other file with its sha256 and
size, so the runtime can refuse a bundle that was corrupted or tampered with in
transit. The pipeline writes bundles with `staged_bundle` + `write_manifest`; the
runtime reads them with `read_manifest` + `verify_files`.

manifest.json (schema_version 3; every field is described in runtime/manifest.schema.json and
docs/manifest.md):
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
  files           {relpath: {sha256, bytes, optional?}} for every file but manifest.json; optional
                  files (report, figures) may be absent, nothing unlisted may be present
  integrity       {algorithm, canonical, manifest_sha256, signature?}: the sha256 of the canonical
                  manifest without `integrity` (and, optionally, an Ed25519 signature of it)
  accuracy        {reference_bits, tolerance, variants: {variant: {bits, delta, tolerance?}}}
  candidates      (3) optional {"SIZE/VARIANT": candidate}: every (size, precision) of a
                  `generate --ladder` bundle, each with its own model, graphs, goldens, accuracy,
                  host latency and a labelled device-latency estimate (runtime.candidates)
  ladder          (3) optional: the ladder's sizes, the estimate's method and calibration, the host pick
  latency_host, tools, provenance   free-form dicts
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .devices.choices import StrEnum, values
from .devices.errors import ProjectableEdgeError
from .atomic import atomic_output
from .graphs import GraphKind

SCHEMA_VERSION = 3  # 3: optional `candidates` + `ladder` (size ladder bundles)
MANIFEST_NAME = "manifest.json"
DEFAULT_GOLDENS = "goldens.npz"
SCHEMA_FILE = "manifest.schema.json"  # shipped beside this module (package data)
CANONICAL = "json: sorted keys, separators (',', ':'), UTF-8, without the 'integrity' field"
RECORD_SUFFIX = ".record.json"  # a device-built engine's own record, next to its plan


class EngineStatus(StrEnum):
    BUILT = "built"  # a TensorRT engine is in the bundle
    DEFERRED = "deferred"  # build_engine.sh builds it on the device
    NOT_APPLICABLE = "not-applicable"  # the target runs ONNX Runtime


ENGINE_STATUSES = values(EngineStatus)
GRAPH_KEYS = tuple(k.key for k in GraphKind)  # {"score": path, "decode": path | null} per variant
REQUIRED_FIELDS = ("schema_version", "task", "target", "tokenizer", "model", "graphs", "selected",
                   "engine", "files", "accuracy", "integrity")
OPTIONAL_DICTS = ("io", "latency_host", "tools", "provenance")
MODEL_FIELDS = ("n_layer", "n_head", "head_dim", "vocab_size", "block_size", "bos_id")


def load_schema() -> dict[str, Any]:
    """The JSON Schema of manifest.json, shipped with the runtime (documented in docs/manifest.md)."""
    return json.loads(Path(__file__).with_name(SCHEMA_FILE).read_text(encoding="utf-8"))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_files(bundle_dir: str | Path, optional: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """{posix relpath: {sha256, bytes[, optional]}} for every regular file except manifest.json.

    A symlink anywhere in the folder is refused: the bundle must hold its own bytes."""
    root = Path(bundle_dir)
    out: dict[str, dict[str, Any]] = {}
    for rel in walk_bundle(root):
        if rel == MANIFEST_NAME:
            continue
        out[rel] = {"sha256": sha256_file(root / rel), "bytes": (root / rel).stat().st_size}
        if rel in optional:
            out[rel]["optional"] = True
    return out


def walk_bundle(root: Path) -> list[str]:
    """Sorted posix relpaths of the regular files under root; a symlink (file or folder) or a special
    file is an error naming it (os.walk never follows links, so nothing outside is ever read)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
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
    _check_candidates(d, m)
    for rel, entry in m["files"].items():
        _relpath(d, f"files[{rel!r}]", rel)
        if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                or isinstance(entry.get("bytes"), bool) or not isinstance(entry.get("bytes"), int)):
            raise _fail(d, f"manifest field 'files[{rel!r}]' must be {{\"sha256\": hex, \"bytes\": int}}")
    return m


def _check_candidates(d: Path, m: dict[str, Any]) -> None:
    """A ladder bundle's candidates: each names its size, variant, model facts and graph paths inside the bundle."""
    cands = m.get("candidates")
    if cands is None:
        return
    if not isinstance(cands, dict) or not cands:
        raise _fail(d, "manifest field 'candidates' must be a non-empty object {\"SIZE/VARIANT\": candidate}")
    for name, c in cands.items():
        where = f"candidates.{name}"
        if not isinstance(c, dict) or not all(isinstance(c.get(k), dict) for k in ("model", "graphs")):
            raise _fail(d, f"manifest field '{where}' must hold 'model' and 'graphs' objects; regenerate the bundle")
        if not isinstance(c.get("size"), str) or not isinstance(c.get("variant"), str):
            raise _fail(d, f"manifest field '{where}' must name its 'size' and 'variant'")
        for f in MODEL_FIELDS:
            x = c["model"].get(f)
            if isinstance(x, bool) or not isinstance(x, int) or x < 1:
                raise _fail(d, f"manifest field '{where}.model.{f}' must be a positive integer, got {x!r}")
        _relpath(d, f"{where}.graphs.score", c["graphs"].get("score"))
        if c["graphs"].get("decode") is not None:
            _relpath(d, f"{where}.graphs.decode", c["graphs"]["decode"])
        _relpath(d, f"{where}.goldens", c.get("goldens", m["goldens"]))


def used_files(m: dict[str, Any]) -> list[str]:
    """Every file the manifest runs from: each variant's graphs, the goldens, and each candidate's."""
    out = [g[k] for g in m["graphs"].values() for k in GRAPH_KEYS if g.get(k)] + [m["goldens"]]
    for c in (m.get("candidates") or {}).values():
        out += [c["graphs"][k] for k in GRAPH_KEYS if c["graphs"].get(k)] + [c.get("goldens", m["goldens"])]
    return list(dict.fromkeys(out))


def canonical_bytes(m: dict[str, Any]) -> bytes:
    """The bytes the manifest digest (and signature) cover: every field but `integrity`, canonically."""
    body = {k: v for k, v in m.items() if k != "integrity"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8")


def manifest_digest(m: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(m)).hexdigest()


def seal(m: dict[str, Any], sign_key: Any = None) -> dict[str, Any]:
    """Return m with a fresh `integrity` field: its canonical digest, signed with sign_key when given
    (an Ed25519 private key: PEM path or key object; needs `cryptography`)."""
    m = {k: v for k, v in m.items() if k != "integrity"}
    digest = manifest_digest(m)
    integrity: dict[str, Any] = {"algorithm": "sha256", "canonical": CANONICAL, "manifest_sha256": digest}
    if sign_key is not None:
        from .signing import sign_digest  # lazy: cryptography only when signing

        integrity["signature"] = sign_digest(sign_key, digest)
    m["integrity"] = integrity
    return m


def _check_integrity(d: Path, raw: dict[str, Any], public_key: Any) -> None:
    """The manifest is what was written: its canonical digest matches, and (with a key) is signed by it."""
    integ = raw.get("integrity")
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


def read_manifest(bundle_dir: str | Path, public_key: Any = None) -> dict[str, Any]:
    """Parse, check and verify manifest.json (its digest; its signature when public_key is given)."""
    d = Path(bundle_dir)
    if not d.is_dir():
        raise ProjectableEdgeError(f"bundle directory '{d}' does not exist; pass the folder "
                                   "`projectable-edge generate` wrote (bundles/<task>__<target>)")
    path = d / MANIFEST_NAME
    if path.is_symlink():
        raise _fail(d, f"'{MANIFEST_NAME}' is a symlink; a bundle must hold real files — copy the bundle again")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _fail(d, f"has no {MANIFEST_NAME}; it is not a bundle or was copied incompletely — "
                       "copy the whole bundle directory again") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _fail(d, f"cannot read {MANIFEST_NAME} ({e}); copy the bundle again") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise _fail(d, f"{MANIFEST_NAME} is not valid JSON ({e}); the file is corrupt, copy the "
                       "bundle again") from None
    m = check_manifest(raw, d)
    _check_integrity(d, raw, public_key)
    return m


def record_path(plan_rel: str) -> str:
    """Where build_engine.sh writes the record of a device-built engine: next to the plan."""
    return plan_rel + RECORD_SUFFIX


def _check_entry(d: Path, rel: str, entry: dict, what: str) -> None:
    p = d / rel
    size = p.stat().st_size
    if size != entry["bytes"]:
        raise _fail(d, f"file '{rel}' has {size} bytes, {what} says {entry['bytes']}; it is "
                       "truncated or modified — copy the bundle again or regenerate it")
    digest = sha256_file(p)
    if digest != entry["sha256"]:
        raise _fail(d, f"file '{rel}' does not match its sha256 in {what} (got {digest[:12]}…, "
                       f"expected {entry['sha256'][:12]}…); it is corrupt or was modified — copy the "
                       "bundle again or regenerate it")


def device_engine_plans(manifest: dict[str, Any]) -> list[str]:
    """Plans build_engine.sh may add on the device (not listed in `files`: built after the manifest)."""
    engine = manifest["engine"]
    if engine.get("status") != EngineStatus.DEFERRED:
        return []
    return [engine[k] for k in ("path", "decode_path") if engine.get(k)]


def read_engine_record(d: Path, plan_rel: str, present: set[str]) -> dict[str, Any]:
    """A device-built engine's record, checked: it names the plan and every file the build wrote, with
    their sha256 and size; those files may then sit in the bundle unlisted by the manifest."""
    rec_rel = record_path(plan_rel)
    if rec_rel not in present:
        raise _fail(d, f"file '{plan_rel}' is not listed in the manifest and has no engine record "
                       f"'{rec_rel}'; rebuild it with `bash {d}/build_engine.sh` (which writes the record) "
                       "or delete it")
    try:
        rec = json.loads((d / rec_rel).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(d, f"engine record '{rec_rel}' is unreadable ({e}); rebuild with `bash {d}/build_engine.sh`") \
            from None
    ok = (isinstance(rec, dict) and isinstance(rec.get("tensorrt_version"), str)
          and isinstance(rec.get("files"), dict) and plan_rel in rec["files"]
          and all(isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int)
                  for e in rec["files"].values()))
    if not ok:
        raise _fail(d, f"engine record '{rec_rel}' must hold tensorrt_version and files{{'{plan_rel}': "
                       f"{{sha256, bytes}}}}; rebuild with `bash {d}/build_engine.sh`")
    for rel, entry in rec["files"].items():
        _relpath(d, f"{rec_rel} files[{rel!r}]", rel)
        if rel not in present:
            raise _fail(d, f"file '{rel}' named by engine record '{rec_rel}' is missing; rebuild with "
                           f"`bash {d}/build_engine.sh`")
        _check_entry(d, rel, entry, f"engine record '{rec_rel}'")
    return rec


def verify_files(bundle_dir: str | Path, manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Strict check of the folder against the manifest; returns the device-built engines' records.

    Every listed file has its size and sha256 (optional ones may be absent); every referenced file is
    listed; nothing is a symlink; nothing unlisted is present, except a device-built engine with its
    own record (the record's hashes are checked too)."""
    d = Path(bundle_dir)
    files = manifest["files"]
    referenced = used_files(manifest)
    if manifest["engine"].get("status") == EngineStatus.BUILT:
        referenced += [manifest["engine"][k] for k in ("path", "decode_path") if manifest["engine"].get(k)]
    for rel in referenced:
        if rel not in files:
            raise _fail(d, f"file '{rel}' is used by the manifest but has no hash in 'files'; "
                           "regenerate the bundle (write_manifest hashes every file)")
        if files[rel].get("optional"):
            raise _fail(d, f"file '{rel}' is needed to run the bundle but marked optional; regenerate the bundle")
    present = set(walk_bundle(d)) - {MANIFEST_NAME}
    for rel, entry in files.items():
        if rel not in present:
            if entry.get("optional"):
                continue
            raise _fail(d, f"file '{rel}' listed in the manifest is missing; copy the whole bundle again")
        _check_entry(d, rel, entry, "the manifest")
    records: dict[str, dict[str, Any]] = {}
    allowed = set(files)
    for plan in device_engine_plans(manifest):
        if plan in present and plan not in files:
            records[plan] = read_engine_record(d, plan, present)
            allowed |= set(records[plan]["files"]) | {record_path(plan)}
    extra = sorted(present - allowed)
    if extra:
        raise _fail(d, f"file '{extra[0]}' is not listed in the manifest" + (f" (nor {extra[1:]})" if extra[1:] else "")
                    + "; a bundle holds only what generate wrote (and device-built engines with their record) "
                      "— delete it or regenerate the bundle")
    return records


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any], optional: tuple[str, ...] = (),
                   sign_key: Any = None) -> dict[str, Any]:
    """Hash every file in the folder into `files` (marking `optional` ones), validate, seal (digest,
    and an Ed25519 signature with sign_key), write manifest.json; return it."""
    d = Path(bundle_dir)
    m = dict(manifest)
    m.setdefault("schema_version", SCHEMA_VERSION)
    m["files"] = hash_files(d, tuple(optional))
    m = json.loads(json.dumps(m))  # exactly what a reader will parse (str keys, lists), so digests agree
    m = seal(check_manifest(seal(m), d), sign_key)
    for rel in used_files(m):
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
