"""Trusting a bundle: the manifest's digest and optional signature, strict loading (no
symlinks, no unlisted files, optional files), device-built TensorRT engines with their own record,
TensorRT shapes from the model, batch splitting, and the manifest's JSON Schema."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import projectable_edge_runtime as runtime
from projectable_edge_runtime.bundle import engine_record
from projectable_edge_runtime.graphs import trt_runner
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.bundle.manifest import (MANIFEST_NAME, SCHEMA_VERSION, json_schema, parse, read_manifest, seal,
                                                    write_manifest)
from projectable_edge_runtime.graphs.runners import OrtRunner

ROOT = Path(__file__).resolve().parents[1]


def _raw(bundle: Path) -> dict:
    return json.loads((bundle / MANIFEST_NAME).read_text())


def _write_raw(bundle: Path, m: dict) -> None:
    (bundle / MANIFEST_NAME).write_text(json.dumps(m, indent=2))


def _rewrite(bundle: Path, optional=(), sign_key=None) -> dict:
    """Rewrite the manifest the way generate does (re-hash, seal), e.g. to mark files optional or sign."""
    m = {k: v for k, v in _raw(bundle).items() if k not in ("files", "integrity")}
    return write_manifest(bundle, m, optional=optional, sign_key=sign_key)


# ----------------------------------------------------------------------------- protected manifest


@pytest.mark.parametrize("edit", [
    lambda m: m["candidates"]["16x2/fp32"]["model"].update(bos_id=99),
    lambda m: m["candidates"]["16x2/fp32"]["accuracy"].update(tolerance=10.0),
    lambda m: m["candidates"]["16x2/fp32"]["accuracy"].update(reference_bits=0.5),
    lambda m: m["task"].update(name="other"),
    lambda m: m.update(extra_field=1),
], ids=["bos_id", "tolerance", "accuracy", "task", "added-field"])
def test_editing_any_manifest_field_is_refused(rt_bundle_copy, edit):
    m = _raw(rt_bundle_copy)
    edit(m)
    _write_raw(rt_bundle_copy, m)
    with pytest.raises(ProjectableEdgeError, match=r"manifest\.json was edited"):
        runtime.load(rt_bundle_copy)


def test_reformatting_the_manifest_is_not_an_edit(rt_bundle_copy):
    m = _raw(rt_bundle_copy)
    (rt_bundle_copy / MANIFEST_NAME).write_text(json.dumps(m, sort_keys=True))  # canonical form ignores layout
    runtime.load(rt_bundle_copy)


def test_a_manifest_without_integrity_is_refused(rt_bundle_copy):
    m = _raw(rt_bundle_copy)
    m.pop("integrity")
    _write_raw(rt_bundle_copy, m)
    with pytest.raises(ProjectableEdgeError, match="integrity"):
        runtime.load(rt_bundle_copy)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name in ("mine", "other"):
        k = ed25519.Ed25519PrivateKey.generate()
        (d / f"{name}.pem").write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
        (d / f"{name}.pub.pem").write_bytes(k.public_key().public_bytes(serialization.Encoding.PEM,
                                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
        out[name] = (d / f"{name}.pem", d / f"{name}.pub.pem")
    return out


def test_signed_bundle_loads_with_its_key_and_only_with_it(rt_bundle_copy, keys, tmp_path):
    mine, mine_pub = keys["mine"]
    unsigned = tmp_path / "unsigned"
    shutil.copytree(rt_bundle_copy, unsigned)
    with pytest.raises(ProjectableEdgeError, match="not signed"):
        runtime.load(unsigned, public_key=mine_pub)

    _rewrite(rt_bundle_copy, sign_key=mine)
    assert _raw(rt_bundle_copy)["integrity"]["signature"]["algorithm"] == "ed25519"
    runtime.load(rt_bundle_copy, public_key=mine_pub)  # correctly signed: loads
    runtime.load(rt_bundle_copy, public_key=mine_pub.read_bytes())  # PEM bytes work too
    runtime.load(rt_bundle_copy)  # without a key the digest is still checked, the signature is not needed

    resigned = tmp_path / "resigned"
    shutil.copytree(rt_bundle_copy, resigned)
    _rewrite(resigned, sign_key=keys["other"][0])
    with pytest.raises(ProjectableEdgeError, match="signature does not verify"):
        runtime.load(resigned, public_key=mine_pub)

    # an edit + a recomputed digest (the attacker has no key) still fails the signature
    original = _raw(rt_bundle_copy)
    for edit, unsigned_loads in ((lambda c: c["model"].update(bos_id=3), False),  # the graphs' own spec says 17
                                 (lambda c: c.update(role="projected@edited"), True)):  # nothing to check it against
        m = copy.deepcopy(original)
        edit(m["candidates"]["16x2/fp32"])
        sig = m["integrity"]["signature"]
        m = seal(m)
        m["integrity"]["signature"] = sig
        _write_raw(rt_bundle_copy, m)
        if unsigned_loads:
            runtime.load(rt_bundle_copy)  # a consistent but unsigned-by-me manifest passes the digest alone...
        else:
            with pytest.raises(ProjectableEdgeError, match="does not describe graph"):
                runtime.load(rt_bundle_copy)
        with pytest.raises(ProjectableEdgeError, match="signature does not verify"):
            runtime.load(rt_bundle_copy, public_key=mine_pub)  # ...not the signature


def test_a_key_file_must_be_pem_not_32_raw_bytes(rt_bundle_copy, keys, tmp_path):
    """Any 32 bytes are an Ed25519 key: read from a file, a raw public key given as the signing key signed with an
    unrelated key, and a raw private key given as the public key was reported as a bundle altered by someone."""
    from cryptography.hazmat.primitives import serialization as s

    mine, mine_pub = keys["mine"]
    k = s.load_pem_private_key(mine.read_bytes(), None)
    raw_pub, raw_priv = tmp_path / "mine.pub.raw", tmp_path / "mine.raw"
    raw_pub.write_bytes(k.public_key().public_bytes(s.Encoding.Raw, s.PublicFormat.Raw))
    raw_priv.write_bytes(k.private_bytes(s.Encoding.Raw, s.PrivateFormat.Raw, s.NoEncryption()))
    with pytest.raises(ProjectableEdgeError, match=r"signing key .*mine\.pub\.raw is not an unencrypted Ed25519 "
                                                   r"private key in PEM.*openssl genpkey"):
        _rewrite(rt_bundle_copy, sign_key=raw_pub)
    _rewrite(rt_bundle_copy, sign_key=mine)
    with pytest.raises(ProjectableEdgeError, match=r"public key .*mine\.raw is not an Ed25519 public key in PEM"):
        runtime.load(rt_bundle_copy, public_key=raw_priv)
    runtime.load(rt_bundle_copy, public_key=raw_pub.read_bytes())  # raw bytes passed in Python are still a key


def test_a_key_given_as_pem_text_or_an_empty_path(rt_bundle_copy, keys, capsys):
    """PEM text in a str (an app reading its key from the environment) was taken for a file name ('No such file'),
    and an empty --public-key "$UNSET" for the current folder ('.' is a directory)."""
    from projectable_edge_runtime.__main__ import main

    mine, mine_pub = keys["mine"]
    _rewrite(rt_bundle_copy, sign_key=mine.read_text())
    runtime.load(rt_bundle_copy, public_key=mine_pub.read_text()).close()
    with pytest.raises(ProjectableEdgeError, match="signature does not verify"):
        runtime.load(rt_bundle_copy, public_key=keys["other"][1].read_text())
    with pytest.raises(ProjectableEdgeError, match=r"the public key path is empty; pass a PEM file"):
        runtime.load(rt_bundle_copy, public_key="")
    assert main(["info", str(rt_bundle_copy), "--public-key", " "]) == 2
    assert "the public key path is empty" in capsys.readouterr().err


def test_device_cli_public_key(rt_bundle_copy, keys, capsys):
    from projectable_edge_runtime.__main__ import main

    assert main(["info", str(rt_bundle_copy), "--public-key", str(keys["mine"][1])]) == 2
    assert "not signed" in capsys.readouterr().err
    _rewrite(rt_bundle_copy, sign_key=keys["mine"][0])
    assert main(["info", str(rt_bundle_copy), "--public-key", str(keys["mine"][1]), "--json"]) == 0


def test_runtime_imports_no_crypto_without_a_key(rt_bundle):
    code = ("import sys, projectable_edge_runtime as r; r.load(sys.argv[1]).score([[0]*64]); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('cryptography', 'torch', 'onnx')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(rt_bundle)], check=True, cwd=ROOT)


# ----------------------------------------------------------------------------- strict loading


def test_symlinked_file_is_refused_even_when_identical(rt_bundle_copy, tmp_path):
    g = rt_bundle_copy / "goldens.npz"
    outside = tmp_path / "outside.npz"
    shutil.copyfile(g, outside)
    g.unlink()
    g.symlink_to(outside)  # same bytes, same hash: still refused
    with pytest.raises(ProjectableEdgeError, match=r"'goldens\.npz' is a symlink"):
        runtime.load(rt_bundle_copy)


def test_symlinked_folder_is_refused(rt_bundle_copy, tmp_path):
    d = rt_bundle_copy / "graphs" / "int8-static"
    shutil.move(d, tmp_path / "moved")
    d.symlink_to(tmp_path / "moved", target_is_directory=True)
    with pytest.raises(ProjectableEdgeError, match=r"'graphs/int8-static' is a symlink"):
        runtime.load(rt_bundle_copy)


def test_unlisted_file_is_refused(rt_bundle_copy):
    shutil.copyfile(rt_bundle_copy / "graphs" / "fp32" / "score.onnx", rt_bundle_copy / "extra.onnx")
    with pytest.raises(ProjectableEdgeError, match=r"'extra\.onnx' is not listed in the manifest"):
        runtime.load(rt_bundle_copy)


def test_what_file_managers_leave_in_a_copy_is_not_refused(rt_bundle_copy):
    """Finder's .DS_Store, the ._* files macOS writes on FAT/exFAT sticks, Explorer's Thumbs.db: never read, so a
    bundle copied that way loads; any other unlisted file is still refused, and a long list of them is cut short."""
    for rel in (".DS_Store", "graphs/fp32/._score.onnx", "Thumbs.db", "graphs/desktop.ini"):
        (rt_bundle_copy / rel).write_bytes(b"\0junk")
    runtime.load(rt_bundle_copy).close()
    for i in range(9):
        (rt_bundle_copy / f"extra{i}.txt").write_text("x")
    with pytest.raises(ProjectableEdgeError, match=r"'extra0\.txt' is not listed .*'extra5\.txt'\] and 3 more\)"):
        runtime.load(rt_bundle_copy)


def test_what_this_user_may_not_read_is_named_as_unreadable(rt_bundle_copy, monkeypatch):
    """A copy that kept another user's modes (tar -p of 0700 folders, 0600 files): load() raised PermissionError,
    not the one exception type, and the files of an unreadable folder were reported missing. Simulated, so that
    it holds for root too."""
    from projectable_edge_runtime.bundle import manifest as mf

    def deny(path: Path, real):
        def call(p, *args, **kwargs):
            if Path(p) == path:
                raise PermissionError(13, "Permission denied", str(p))
            return real(p, *args, **kwargs)
        return call

    b = rt_bundle_copy
    for module, attr, name in ((os, "scandir", "graphs/fp32"), (mf, "open", "goldens.npz"),
                               (Path, "read_text", MANIFEST_NAME)):
        monkeypatch.setattr(module, attr, deny(b / name, getattr(module, attr, open)), raising=False)
        with pytest.raises(ProjectableEdgeError, match=rf"cannot read '{name}' \(Permission denied\); give this user "
                                                       r"read access to the bundle"):
            runtime.load(b)
        monkeypatch.undo()
    runtime.load(b).close()


def test_a_manifest_that_is_no_regular_file_is_refused_without_reading_it(rt_bundle_copy):
    """A FIFO (a tar archive can hold one) in manifest.json's place: reading it waited for a writer forever."""
    import threading

    m = rt_bundle_copy / MANIFEST_NAME
    m.unlink()
    os.mkfifo(m)
    def feed():  # lets a reader that opened the FIFO go on, so the test ends either way
        with open(m, "w") as f:
            f.write("{}")
    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    with pytest.raises(ProjectableEdgeError, match=r"'manifest\.json' is not a regular file; copy the bundle again"):
        runtime.load(rt_bundle_copy)
    reader = os.open(m, os.O_RDONLY | os.O_NONBLOCK)  # the writer's turn to go on
    writer.join(10)
    os.close(reader)


def test_optional_files_may_be_absent(rt_graphs, rt_build, tmp_path):
    b = rt_build(tmp_path / "b", rt_graphs, extra_files={"samples.png": b"png", "report.md": b"# report"})
    with pytest.raises(ProjectableEdgeError, match=r"'samples\.png' listed in the manifest is missing"):
        (b / "samples.png").unlink()
        runtime.load(b)
    (b / "samples.png").write_bytes(b"png")
    m = _rewrite(b, optional=("samples.png", "report.md"))
    assert m.files["samples.png"].optional is True and m.files["goldens.npz"].optional is False
    (b / "samples.png").unlink()
    (b / "report.md").unlink()
    runtime.load(b).score(np.zeros((1, 64), np.int64))  # slimmed bundle still loads
    (b / "report.md").write_text("# edited")  # an optional file that is present must still match
    with pytest.raises(ProjectableEdgeError, match=r"report\.md"):
        runtime.load(b)


# ----------------------------------------------------------------------------- device-built engines


class _OrtAsTrt(OrtRunner):
    """Stands in for TrtRunner: the stub 'plan' is an ONNX graph, so ONNX Runtime can run it."""

    calls: list[int] = []

    def __init__(self, path, name=None):
        super().__init__(path, ["CPUExecutionProvider"], 1, name=name or f"tensorrt:{Path(path).name}")

    def run(self, feed):
        _OrtAsTrt.calls.append(len(next(iter(feed.values()))))
        return super().run(feed)


def _deferred_jetson_bundle(rt_build, rt_graphs, dest: Path) -> Path:
    engine = {"status": "deferred", "variant": "fp32", "path": "engine/score.plan",
              "decode_path": "engine_decode/decode.plan", "tensorrt_version": "10.3",
              "command": "bash build_engine.sh"}
    return rt_build(dest, rt_graphs, target="jetson-orin-nano", variants=("fp32",), engine=engine,
                    extra_files={"build_engine.sh": b"#!/usr/bin/env bash\n"})


def _stub_device_build(b: Path, version: str) -> None:
    """What build_engine.sh does on a device, with trtexec replaced by a copy: plans, a log, records."""
    (b / "engine").mkdir(exist_ok=True)
    (b / "engine_decode").mkdir(exist_ok=True)
    shutil.copyfile(b / "graphs/fp32/score.onnx", b / "engine/score.plan")
    shutil.copyfile(b / "graphs/fp32/decode.onnx", b / "engine_decode/decode.plan")
    (b / "engine" / "build_engine.log").write_text(f"&&&& PASSED TensorRT.trtexec [TensorRT v{version}]\n")
    engine_record.write_records(b, tensorrt_version=version, device="stub Jetson Orin Nano",
                                runner_factory=_OrtAsTrt, log=lambda _: None)


def test_device_built_engine_with_another_tensorrt_version_is_accepted(rt_graphs, rt_build, tmp_path, monkeypatch):
    b = _deferred_jetson_bundle(rt_build, rt_graphs, tmp_path / "b")
    assert read_manifest(b).target.software["tensorrt"] == "10.3"
    _stub_device_build(b, "10.7.0")  # the device has TensorRT 10.7, the profile said 10.3
    rec = json.loads((b / "engine/score.plan.record.json").read_text())
    assert rec["tensorrt_version"] == "10.7.0" and rec["test_inference"]["passed"]
    assert set(rec["files"]) == {"engine/score.plan", "engine/build_engine.log"}

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.7.0"))
    monkeypatch.setattr(trt_runner, "TrtRunner", _OrtAsTrt)
    m = runtime.load(b)  # no "rebuild" loop: the record, not the profile, says which TensorRT built it
    assert m.backend["backend"] == "tensorrt", m.backend["reason"]
    assert "10.7.0" in m.backend["reason"] and "stub Jetson" in m.backend["reason"]
    assert runtime.validate(m)["passed"]

    # batches above the engine's limit (the profile's max batch, 32) are split, with the same tokens
    _OrtAsTrt.calls.clear()
    tokens = m.sample(40, seed=3)
    assert max(_OrtAsTrt.calls) == 32
    ort_tokens = runtime.load(b, backend="onnxruntime").sample(40, seed=3)
    np.testing.assert_array_equal(tokens, ort_tokens)
    _OrtAsTrt.calls.clear()
    assert m.score(np.zeros((70, 64), np.int64)).shape == (70,) and max(_OrtAsTrt.calls) == 32

    # another TensorRT on the device: ONNX Runtime, with a rebuild command that works from anywhere
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    m = runtime.load(b)
    assert m.backend["backend"] == "onnxruntime"
    assert f"bash {(b / 'build_engine.sh').resolve()}" in m.backend["reason"]


def test_device_built_engine_is_hash_checked_and_needs_its_record(rt_graphs, rt_build, tmp_path):
    b = _deferred_jetson_bundle(rt_build, rt_graphs, tmp_path / "b")
    (b / "engine").mkdir()
    (b / "engine/score.plan").write_bytes(b"plan without a record")
    with pytest.raises(ProjectableEdgeError, match=r"'engine/score\.plan' is not listed.*no engine record"):
        runtime.load(b)
    shutil.rmtree(b / "engine")
    _stub_device_build(b, "10.7.0")
    runtime.load(b)
    with open(b / "engine/score.plan", "ab") as f:
        f.write(b"x")
    with pytest.raises(ProjectableEdgeError, match=r"engine/score\.plan.*engine record"):
        runtime.load(b)


def test_engine_record_cli_says_what_to_do_on_each_kind_of_bundle(rt_bundle, rt_graphs, rt_build, tmp_path, capsys):
    """On an ONNX Runtime bundle it asked to run build_engine.sh, which such a bundle does not have."""
    assert engine_record.main([str(rt_bundle), "--tensorrt-version", "10.3"]) == 2
    err = capsys.readouterr().err
    assert "engine.status is 'not-applicable'" in err and "build_engine.sh" not in err and "TensorRT target" in err
    b = _deferred_jetson_bundle(rt_build, rt_graphs, tmp_path / "b")
    assert engine_record.main([str(b), "--tensorrt-version", "10.3"]) == 2
    assert "run build_engine.sh first" in capsys.readouterr().err


def test_failed_test_inference_falls_back(rt_graphs, rt_build, tmp_path, monkeypatch):
    b = _deferred_jetson_bundle(rt_build, rt_graphs, tmp_path / "b")
    (b / "engine").mkdir()
    shutil.copyfile(b / "graphs/fp32/decode.onnx", b / "engine/score.plan")  # wrong graph: cannot score
    engine_record.write_records(b, tensorrt_version="10.3.1", device="stub", runner_factory=_OrtAsTrt,
                                log=lambda _: None)
    assert not json.loads((b / "engine/score.plan.record.json").read_text())["test_inference"]["passed"]
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.1"))
    m = runtime.load(b)
    assert m.backend["backend"] == "onnxruntime" and "test inference did not pass" in m.backend["reason"]


@pytest.mark.parametrize("edit", [
    {"test_inference": "passed"},  # build_engine.sh writes an object
    {"test_inference": [True]},
    {"tensorrt_version": ""},  # no version: the version lock could not be checked
    {"tensorrt_version": "  "},
], ids=["test-str", "test-list", "version-empty", "version-blank"])
def test_an_engine_record_unlike_build_engines_is_refused_in_one_line(rt_graphs, rt_build, tmp_path, edit, capsys):
    from projectable_edge_runtime.__main__ import main

    b = _deferred_jetson_bundle(rt_build, rt_graphs, tmp_path / "b")
    _stub_device_build(b, "10.7.0")
    rec = b / "engine/score.plan.record.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), **edit}))
    with pytest.raises(ProjectableEdgeError, match=r"engine record 'engine/score\.plan\.record\.json' must hold"):
        runtime.load(b)
    assert main(["info", str(b), "--json"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["exit_code"] == 2 and out.err.count("\n") == 1 and "rebuild with" in out.err


def test_a_decode_plan_whose_test_inference_failed_is_not_used(rt_graphs, rt_build, tmp_path, monkeypatch):
    b = _deferred_jetson_bundle(rt_build, rt_graphs, tmp_path / "b")
    _stub_device_build(b, "10.7.0")
    rec = b / "engine_decode/decode.plan.record.json"
    failed = {"passed": False, "graph": "decode", "reason": "bits/dim 9.9 vs the PyTorch reference 2.0"}
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "test_inference": failed}))
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.7.0"))
    monkeypatch.setattr(trt_runner, "TrtRunner", _OrtAsTrt)
    m = runtime.load(b)
    assert m.backend["backend"] == "tensorrt" and m.backend["score_runner"] == "tensorrt:engine/score.plan"
    assert m.backend["decode_runner"] == "onnxruntime:graphs/fp32/decode.onnx"  # the scoring engine passed, this not
    assert "bits/dim 9.9" in m.backend["reason"]
    # a decode plan built by another TensorRT than the device's is not used either
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "test_inference": {"passed": True},
                               "tensorrt_version": "8.6.1"}))
    m = runtime.load(b)
    assert m.backend["decode_runner"] == "onnxruntime:graphs/fp32/decode.onnx" and "8.6.1" in m.backend["reason"]


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kw, match", [
    (dict(n=10**12), r"1\.\.65536"),
    (dict(n=2.5), r"1\.\.65536"),
    (dict(n=2, seed=1.5), r"seed must be an integer in 0\.\."),
    (dict(n=2, seed="7"), r"seed must be an integer in 0\.\."),
    (dict(n=2, seed=-1), r"seed must be an integer in 0\.\."),
])
def test_sample_refuses_bad_n_and_seed(rt_bundle, kw, match):
    with pytest.raises(ProjectableEdgeError, match=match):
        runtime.load(rt_bundle).sample(**kw)


# ----------------------------------------------------------------------------- schema


def test_schema_ships_with_the_runtime_and_accepts_test_bundles(rt_bundle):
    import jsonschema

    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(_raw(rt_bundle), schema)
    bad = _raw(rt_bundle)
    bad["candidates"]["16x2/fp32"]["model"]["bos_id"] = "99"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    bad = _raw(rt_bundle)
    bad["files"]["../evil"] = {"sha256": "0" * 64, "bytes": 1}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(jsonschema.ValidationError, match="None should not be valid"):  # a bundle is sealed
        jsonschema.validate({**_raw(rt_bundle), "integrity": None}, schema)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(schema_version=SCHEMA_VERSION + 1),
    lambda m: m.update(candidates={}),
    lambda m: m["files"].update({"a\n/../../evil": {"sha256": "0" * 64, "bytes": 1}}),
    lambda m: m["tokenizer"].update(channels=2),
    lambda m: m["tokenizer"].update(levels=300),
    lambda m: m["tokenizer"].update(extra=1),
    lambda m: m["target"].update(extra=1),
    lambda m: m["target"]["budgets"].update(extra=1),
])
def test_the_schema_refuses_what_the_loader_refuses(rt_bundle, edit):
    import jsonschema

    bad = _raw(rt_bundle)
    edit(bad)
    with pytest.raises(ProjectableEdgeError):
        parse(bad)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json_schema())


# ----------------------------------------------------------------------------- unwritable --out


@pytest.mark.parametrize("command", ["train", "generate"])
def test_out_in_an_unwritable_folder_is_one_clear_error(command, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from projectable_edge import cli_common
    from projectable_edge.cli import app

    locked = tmp_path / "locked"
    locked.mkdir()

    def refuse(folder):
        if Path(folder) == locked:
            raise PermissionError(13, "Permission denied")
        return None

    if os.geteuid() == 0:  # root writes anywhere: simulate the permission check failing
        monkeypatch.setattr(cli_common, "probe_writable", refuse)
    else:
        locked.chmod(0o555)
    args = {"train": ["train", "--preset", "tiny", "--steps", "2", "--out", str(locked / "run")],
            "generate": ["generate", "--task", "3", "--target", "jetson", "--source", str(tmp_path / "no-run"),
                         "--out", str(locked / "sub" / "b")]}[command]
    res = CliRunner().invoke(app, args)
    locked.chmod(0o755)
    assert res.exit_code == 2, res.output
    flat = res.output.replace("\n", "")
    assert re.search(r"not\s*writable", flat) and str(locked) in flat and "Traceback" not in flat
    assert list(locked.iterdir()) == []
    # a file where a folder should be
    (tmp_path / "afile").write_text("x")
    res = CliRunner().invoke(app, args[:-1] + [str(tmp_path / "afile" / "run")])
    assert res.exit_code == 2 and re.search(r"not\s*a\s*folder", res.output)


def test_the_field_tables_of_the_docs_are_the_format_itself():
    """docs/manifest.md's tables are generated from the dataclasses, which also give the schema and the checks."""
    doc = (ROOT / "docs" / "manifest.md").read_text()
    assert field_tables() in doc, ("docs/manifest.md is out of date: replace its field tables with the output of "
                                   "`python -c 'import sys; sys.path.insert(0, \"tests\"); import test_bundle_trust as t; "
                                   "print(t.field_tables())'`")
    schema = json_schema()
    assert all(p["description"] for p in schema["properties"].values())
    assert "`selected`" in doc and "`reference_bits`" in doc and "`tolerance`" in doc


def test_the_device_cli_prints_the_schema(capsys):
    from projectable_edge_runtime.__main__ import main

    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema()


# ----------------------------------------------------------------------------- docs/manifest.md, generated


def _type_name(tp) -> str:
    import dataclasses
    import typing
    from enum import Enum

    from projectable_edge_runtime.bundle.manifest import _optional, _unwrap

    tp, tag = _unwrap(tp)
    if (inner := _optional(tp)) is not None:
        return f"{_type_name(inner)} or null"
    if dataclasses.is_dataclass(tp):
        return f"object ({tp.__name__})"
    if typing.get_origin(tp) is dict:
        return f"{{string: {_type_name(typing.get_args(tp)[1])}}}"
    if typing.get_origin(tp) is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " / ".join(f"`{m.value}`" for m in tp)
    words = {int: "integer", str: "string", float: "number", bool: "boolean", dict: "object"}
    return {"positive": "positive integer", "relpath": "path in the bundle"}.get(tag) or words.get(tp, "any")


def field_tables() -> str:
    """docs/manifest.md's field tables, one per dataclass of the format, from the fields' own docs."""
    import dataclasses
    import typing

    from projectable_edge_runtime.bundle.manifest import Manifest, _fields, _hints, _unwrap

    def nested(tp) -> list:
        tp = _unwrap(tp)[0]
        return [tp] if dataclasses.is_dataclass(tp) else [t for a in typing.get_args(tp) for t in nested(a)]

    out, seen, todo = [], set(), [Manifest]
    while todo:
        cls = todo.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        hints = _hints(cls)
        out += [f"### `{cls.__name__}`", "", "| field | type | meaning |", "|---|---|---|"]
        for f in _fields(cls):
            out.append(f"| `{f.name}` | {_type_name(hints[f.name])} | {f.metadata.get('doc', '')} |")
            todo += [t for t in nested(hints[f.name]) if t not in seen]
        out.append("")
    return "\n".join(out)
