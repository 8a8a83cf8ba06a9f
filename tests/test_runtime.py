"""The torch-free runtime: bundle format, verification, scoring, sampling, validation, benchmark, CLI.

Bundles come from the `rt_bundle` fixture (tests/conftest.py): a tiny SpecialisedModel exported
with torch.onnx, written with the runtime's own staged_bundle + write_manifest.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import projectable_edge_runtime as runtime
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.devices.profiles import Budgets
from projectable_edge_runtime.graphs import sampler
from projectable_edge_runtime.__main__ import main
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.bundle.manifest import (MANIFEST_NAME, SCHEMA_VERSION, read_manifest, seal, staged_bundle,
                                               write_manifest)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rt_model(rt_bundle):
    return runtime.load(rt_bundle)


def _edit_manifest(bundle, fn):
    """Edit and re-seal (a fresh digest), to reach the checks behind the digest; an edit without a
    fresh digest is refused (tests/test_bundle_trust.py)."""
    path = bundle / MANIFEST_NAME
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(seal(m)))


# ----------------------------------------------------------------------------- load + verify


def test_load_picks_selected_variant_and_reports_providers(rt_model):
    assert rt_model.variant == "fp32"
    assert rt_model.backend["backend"] == "onnxruntime"
    assert rt_model.backend["providers"] == ["CPUExecutionProvider"]
    assert rt_model.decode_runner is not None and rt_model.load_time_s > 0
    assert rt_model.candidate == "16x2/fp32"
    assert rt_model.info()["candidates"] == ["16x2/fp32", "16x2/int8-static"]


def test_precision_prefix_and_unknown_precision(rt_bundle):
    assert runtime.load(rt_bundle, precision="int8").variant == "int8-static"
    with pytest.raises(ProjectableEdgeError, match=r"precision 'fp16'.*fp32, int8-static"):
        runtime.load(rt_bundle, precision="fp16")


def test_write_manifest_hashes_every_file_but_itself(rt_bundle):
    m = read_manifest(rt_bundle)
    on_disk = {p.relative_to(rt_bundle).as_posix() for p in rt_bundle.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {MANIFEST_NAME}
    g = rt_bundle / "goldens.npz"
    assert (m.files["goldens.npz"].sha256, m.files["goldens.npz"].bytes) == \
        (hashlib.sha256(g.read_bytes()).hexdigest(), g.stat().st_size)
    assert m.schema_version == SCHEMA_VERSION


def test_tampered_file_is_named(rt_bundle_copy):
    p = rt_bundle_copy / "graphs" / "int8-static" / "decode.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash can catch it
    p.write_bytes(bytes(data))
    with pytest.raises(ProjectableEdgeError, match=r"graphs/int8-static/decode\.onnx.*sha256"):
        runtime.load(rt_bundle_copy)  # even a variant that is not selected is checked


def test_truncated_and_missing_files_are_named(rt_bundle_copy):
    g = rt_bundle_copy / "goldens.npz"
    g.write_bytes(g.read_bytes()[:-10])
    with pytest.raises(ProjectableEdgeError, match=r"'goldens\.npz' has \d+ bytes"):
        runtime.load(rt_bundle_copy)
    g.unlink()
    with pytest.raises(ProjectableEdgeError, match=r"'goldens\.npz' listed in the manifest is missing"):
        runtime.load(rt_bundle_copy)


def test_missing_manifest_and_bad_json(rt_bundle_copy, tmp_path):
    with pytest.raises(ProjectableEdgeError, match="does not exist"):
        runtime.load(tmp_path / "nope")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ProjectableEdgeError, match="'.*a-file' is a file; pass the folder"):
        runtime.load(tmp_path / "a-file")
    (rt_bundle_copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ProjectableEdgeError, match="not valid JSON"):
        runtime.load(rt_bundle_copy)
    (rt_bundle_copy / MANIFEST_NAME).unlink()
    with pytest.raises(ProjectableEdgeError, match="has no manifest.json"):
        runtime.load(rt_bundle_copy)


def test_newer_schema_asks_for_upgrade_and_older_for_regeneration(rt_bundle_copy):
    _edit_manifest(rt_bundle_copy, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ProjectableEdgeError, match="newer than this runtime.*upgrade the runtime"):
        runtime.load(rt_bundle_copy)
    _edit_manifest(rt_bundle_copy, lambda m: m.update(schema_version=SCHEMA_VERSION - 1))
    with pytest.raises(ProjectableEdgeError, match="older projectable-edge.*regenerate the bundle.*runtime/\\*\\.whl"):
        runtime.load(rt_bundle_copy)


def test_missing_field_is_named(rt_bundle_copy):
    good = json.loads((rt_bundle_copy / MANIFEST_NAME).read_text())
    _edit_manifest(rt_bundle_copy, lambda m: m.pop("candidates"))
    with pytest.raises(ProjectableEdgeError, match=r"missing field 'candidates'"):
        runtime.load(rt_bundle_copy)
    _edit_manifest(rt_bundle_copy, lambda m: m.update(candidates={"16x2/fp32": {"size": "16x2"}}))
    with pytest.raises(ProjectableEdgeError, match=r"missing field 'candidates\.16x2/fp32\.variant'"):
        runtime.load(rt_bundle_copy)
    _edit_manifest(rt_bundle_copy, lambda m: m.update(candidates=good["candidates"], selected="16x2/fp8"))
    with pytest.raises(ProjectableEdgeError, match=r"unknown candidate '16x2/fp8'"):
        runtime.load(rt_bundle_copy)


def _fp32(m) -> dict:
    return m["candidates"]["16x2/fp32"]


@pytest.mark.parametrize("edit,match", [
    (lambda m: _fp32(m)["accuracy"].update(tolerance=float("inf")), r"'candidates\.16x2/fp32\.accuracy\.tolerance' "
                                                                    "must be a finite number, got inf"),
    (lambda m: _fp32(m)["accuracy"].update(reference_bits=float("nan")), r"accuracy\.reference_bits' must be a finite"),
    (lambda m: _fp32(m)["accuracy"].update(tolerance=-0.5), r"accuracy\.tolerance' must be a number >= 0"),
    (lambda m: m["provenance"].update(x=[1, float("nan")]), r"'provenance\.x\[1\]' must be a finite number"),
    (lambda m: m["task"].update(index=10**400), r"'task\.index' must be an integer within int64"),
    (lambda m: m["task"].update(index=-1), r"'task\.index' must be a number >= 0"),
    (lambda m: _fp32(m)["model"].update(block_size=1e9), r"model\.block_size' must be an integer"),
    (lambda m: _fp32(m)["model"].update(bos_id=99999), r"bos_id 99999 is beyond the vocabulary .*at most 17"),
    # well-formed numbers that no longer describe the graphs: refused against the spec each graph carries
    (lambda m: _fp32(m)["model"].update(block_size=10**9), r"does not describe graph .*block_size 1000000000 "
                                                            r"\(the graph says 64\)"),
    (lambda m: _fp32(m)["model"].update(n_head=3), r"candidate 16x2/fp32 does not describe graph .*n_head 3"),
])
def test_manifest_numbers_out_of_range_are_refused_when_read(rt_bundle_copy, capsys, edit, match):
    """Tampered with the digest recomputed: non-finite, negative or huge numbers name their field, exit 2
    (tolerance Infinity passed validate and printed non-JSON; reference_bits NaN was a FAIL, exit 1)."""
    _edit_manifest(rt_bundle_copy, edit)
    assert main(["validate", str(rt_bundle_copy), "--json"]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["exit_code"] == 2 and out.err.count("\n") == 1 and re.search(match, out.err), out.err


def test_manifest_cannot_point_outside_or_at_unhashed_files(rt_bundle_copy):
    def graphs(m):
        return m["candidates"]["16x2/fp32"]["graphs"]

    _edit_manifest(rt_bundle_copy, lambda m: graphs(m).update(score="../evil.onnx"))
    with pytest.raises(ProjectableEdgeError, match="'candidates.16x2/fp32.graphs.score'.*outside the bundle"):
        runtime.load(rt_bundle_copy)
    _edit_manifest(rt_bundle_copy, lambda m: graphs(m).update(score="graphs/fp32/score.onnx"))
    _edit_manifest(rt_bundle_copy, lambda m: m["files"].pop("graphs/fp32/score.onnx"))
    with pytest.raises(ProjectableEdgeError, match=r"'graphs/fp32/score\.onnx' is used by the manifest but has no"):
        runtime.load(rt_bundle_copy)


# ----------------------------------------------------------------------------- atomic writing


def test_staged_bundle_is_atomic(tmp_path):
    dest = tmp_path / "b"
    with pytest.raises(RuntimeError):
        with staged_bundle(dest) as tmp:
            (tmp / "half.onnx").write_bytes(b"x")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []  # no dest, no temp dir left behind
    with pytest.raises(ProjectableEdgeError, match="no manifest.json"):
        with staged_bundle(dest) as tmp:
            (tmp / "a.onnx").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_needs_overwrite(rt_graphs, rt_build, tmp_path):
    dest = rt_build(tmp_path / "b", rt_graphs, variants=("fp32",))
    with pytest.raises(ProjectableEdgeError, match="already exists.*overwrite"):
        rt_build(dest, rt_graphs)
    rt_build(dest, rt_graphs, variants=("fp32", "fp16"), overwrite=True)
    assert sorted(read_manifest(dest).candidates) == ["16x2/fp16", "16x2/fp32"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_bundle(rt_graphs, rt_build, tmp_path):
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.txt").write_text("years of work")
    with pytest.raises(ProjectableEdgeError, match="is not a bundle .*no manifest.json.*not replaced"):
        rt_build(mine, rt_graphs, variants=("fp32",), overwrite=True)
    assert [p.name for p in mine.iterdir()] == ["chapter1.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thesis"]
    (tmp_path / "empty").mkdir()  # an empty folder loses nothing: it is replaced
    rt_build(tmp_path / "empty", rt_graphs, variants=("fp32",), overwrite=True)
    assert (tmp_path / "empty" / "manifest.json").is_file()


def test_a_folder_made_by_another_process_meanwhile_is_not_replaced(tmp_path):
    dest = tmp_path / "out"
    with pytest.raises(ProjectableEdgeError, match="created by another process"):
        with atomic_output(dest, directory=True) as tmp:
            (tmp / "mine.json").write_text("{}")
            dest.mkdir()  # another process published its output while this one was writing
            (dest / "theirs.json").write_text("{}")
    assert [p.name for p in dest.iterdir()] == ["theirs.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_manifest_rejects_what_it_cannot_write(rt_bundle, tmp_path):
    m = read_manifest(rt_bundle)
    with pytest.raises(ProjectableEdgeError, match="unknown candidate '16x2/fp8'"):
        write_manifest(tmp_path, dataclasses.replace(m, selected="16x2/fp8"))
    with pytest.raises(ProjectableEdgeError, match="'graphs/fp32/score.onnx' named in the manifest is not in the bundle"):
        write_manifest(tmp_path, m)  # the graphs are not in this folder
    assert not (tmp_path / MANIFEST_NAME).exists()


# ----------------------------------------------------------------------------- scoring


def test_score_matches_pytorch_reference(rt_model, rt_graphs):
    bits = rt_model.score(rt_graphs["goldens"])
    assert bits.dtype == np.float64 and bits.shape == (len(rt_graphs["goldens"]),)
    np.testing.assert_allclose(bits, rt_graphs["ref_bits"], atol=1e-4)
    np.testing.assert_allclose(rt_model.score(rt_graphs["goldens"][0]), bits[:1])  # one sequence
    rt_model.max_batch = 5  # chunked scoring must give the same numbers
    try:
        np.testing.assert_allclose(rt_model.score(rt_graphs["goldens"]), bits, rtol=1e-6)
    finally:
        rt_model.max_batch = 256


def test_score_images_equals_score_tokens(rt_model, rt_graphs):
    tokens = rt_graphs["goldens"][:4]
    images = rt_model.decode_images(tokens)
    assert images.dtype == np.uint8 and images.shape == (4, 8, 8)
    np.testing.assert_array_equal(rt_model.score(images), rt_model.score(tokens))


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 7, 7), np.uint8), r"images have shape \(2, 7, 7\), expected \[N, 8, 8\]"),
    (np.zeros((2, 8, 8, 3), np.uint8), r"expected \[N, 8, 8\]"),
    (np.full((2, 64), 17, np.int64), r"out of range.*0\.\.16"),
    (np.full((2, 64), -1, np.int64), "out of range"),
    (np.zeros((2, 63), np.int64), r"tokens have shape \(2, 63\)"),
    (np.zeros((2, 64), np.float32), "must be integers"),
    (np.zeros((2, 64), np.uint8), r"read as images.*pass tokens \[N, 64\] as int64"),  # not "resize"
])
def test_bad_inputs_raise_clear_errors(rt_model, bad, match):
    with pytest.raises(ProjectableEdgeError, match=match):
        rt_model.score(bad)


def test_ragged_lists_raise_clear_errors(rt_model):
    with pytest.raises(ProjectableEdgeError, match="images or tokens are ragged"):
        rt_model.score([[0] * 64, [0] * 63])
    with pytest.raises(ProjectableEdgeError, match="prefix tokens are ragged"):
        rt_model.complete([[0, 1], [2]])
    with pytest.raises(ProjectableEdgeError, match="tokens are ragged"):  # was numpy's ValueError
        rt_model.decode_images([[0] * 64, [0] * 63])


# ----------------------------------------------------------------------------- sampling


def _greedy_by_recompute(score_path, n, length):
    """Independent reference: full-sequence scoring graph, argmax, one position at a time."""
    sess = ort.InferenceSession(str(score_path), providers=["CPUExecutionProvider"])
    out = np.zeros((n, length), np.int64)
    for i in range(length):
        out[:, i] = sess.run(["logits"], {"tokens": out})[0][:, i].argmax(-1)
    return out


def test_kv_cache_greedy_equals_full_recompute(rt_model, rt_graphs):
    kv = rt_model.sample(3, temperature=0)
    assert kv.shape == (3, 64) and kv.dtype == np.int64
    np.testing.assert_array_equal(kv, _greedy_by_recompute(rt_graphs["score"], 3, 64))
    assert len(np.unique(kv[0])) > 3  # the comparison is not vacuous (not one repeated token)


def test_kv_cache_sampling_equals_recompute_with_same_seed(rt_model):
    kv = rt_model.sample(4, temperature=1.0, top_k=8, seed=7)
    rc = sampler.sample_recompute(rt_model.score_runner, 4, 64, None, 1.0, 8, 7)
    np.testing.assert_array_equal(kv, rc)


def test_sampling_is_seeded_and_in_range(rt_model):
    a, b, c = rt_model.sample(4, seed=1), rt_model.sample(4, seed=1), rt_model.sample(4, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0 and a.max() < 17
    np.testing.assert_array_equal(rt_model.sample(2, top_k=1, seed=5), rt_model.sample(2, temperature=0))


def test_first_token_frequencies_follow_the_model(rt_model):
    n = 2000
    res = rt_model.decode_runner.run({"token": np.full((1, 1), 17, np.int64),
                                      "past_keys": np.zeros((2, 1, 2, 0, 8), np.float32),
                                      "past_values": np.zeros((2, 1, 2, 0, 8), np.float32)})
    z = res["logits"][0].astype(np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    draws = np.stack([sampler.choose(res["logits"].repeat(n, 0), np.random.default_rng(s).random(n), 1.0, None)
                      for s in range(3)]).ravel()
    freq = np.bincount(draws, minlength=17) / draws.size
    assert 0.5 * np.abs(freq - p).sum() < 0.03  # total variation distance


def test_a_seeds_tokens_are_the_inverse_cdf_of_its_uniforms():
    """Pinned so a faster sampler cannot change a seed's images: one rng.random(n) per sampled step
    (drawn up front), and the first id whose float64 CDF exceeds u * total (the last id if none)."""
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(sampler.uniforms(7, 3, 4, 1.0), np.stack([rng.random(3) for _ in range(4)]))
    assert sampler.uniforms(7, 3, 4, 0) is None  # greedy draws nothing
    logits = (np.random.default_rng(0).standard_normal((500, 17)) * 3).astype(np.float32)
    u = sampler.uniforms(1, 500, 1, 1.0)[0]
    u[:2] = 0.0, np.nextafter(1.0, 0.0)  # both ends of [0, 1)
    for temperature, top_k in ((1.0, None), (0.7, 5)):
        z = logits.astype(np.float64) / temperature
        if top_k:
            z = np.where(z < np.sort(z, axis=-1)[:, -top_k, None], -np.inf, z)
        cdf = np.cumsum(np.exp(z - z.max(axis=-1, keepdims=True)), axis=-1)
        want = np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(axis=-1), 16)
        np.testing.assert_array_equal(sampler.choose(logits, u, temperature, top_k), want)


def test_one_row_choice_is_the_same_inverse_cdf():
    """The one-row fast path of choose() (a single image's sampling) gives the batch path's ids, at both ends
    of [0, 1), at any temperature, and the last id for a NaN row, as the batch path does."""
    logits = (np.random.default_rng(3).standard_normal((300, 17)) * 3).astype(np.float32)
    logits[5, 2], logits[6, 4] = np.nan, np.inf
    u = sampler.uniforms(2, 300, 1, 1.0)[0]
    u[:2] = 0.0, np.nextafter(1.0, 0.0)
    for temperature, top_k in ((1.0, None), (0.7, 17), (1.6, None)):
        with np.errstate(invalid="ignore"):  # the NaN and inf rows
            batch = sampler.choose(logits, u, temperature, top_k)
            rows = [int(sampler.choose(logits[i:i + 1], u[i:i + 1], temperature, top_k)[0]) for i in range(300)]
        np.testing.assert_array_equal(rows, batch)
        assert batch[5] == batch[6] == 16 and len(set(rows)) > 5


def test_chunked_sampling_holds_one_chunk_at_a_time_and_changes_no_token(rt_model):
    """A large sample(n) in chunks of max_batch rows runs each chunk to the end before the next starts: memory
    holds one chunk's cache, not n rows' (sample(16384) of an 8x8 bundle peaked at 2.4 GB when the chunks ran
    in lockstep), and the tokens are those of one unchunked call."""
    runner, calls = rt_model.decode_runner, []
    spy = types.SimpleNamespace(input_names=runner.input_names, input_dtypes=runner.input_dtypes,
                                run=lambda feed: calls.append(len(feed["token"])) or runner.run(feed))
    layout, prefix = rt_model.layout, np.ones((5, 3), np.int64)
    for kw in ({"seed": 2}, {"seed": 3, "prefix": prefix, "top_k": 4}):
        calls.clear()
        chunked = sampler.sample_kv(spy, layout, 5, 64, max_batch=2, **kw)
        assert calls == [2] * 64 + [2] * 64 + [1] * 64
        np.testing.assert_array_equal(chunked, sampler.sample_kv(runner, layout, 5, 64, **kw))


def test_complete_keeps_prefix_and_matches_greedy(rt_model, rt_graphs):
    prefix = rt_graphs["goldens"][:3, :16]
    out = rt_model.complete(prefix, seed=3)
    np.testing.assert_array_equal(out[:, :16], prefix)
    assert out.shape == (3, 64) and out.max() < 17
    greedy = rt_model.sample(2, temperature=0)
    np.testing.assert_array_equal(rt_model.complete(greedy[:, :20], temperature=0), greedy)
    with pytest.raises(ProjectableEdgeError, match="out of range"):
        rt_model.complete(np.full((1, 4), 99))


@pytest.mark.parametrize("kw,match", [({"n": 0}, r"integer in 1\.\."), ({"n": 2, "temperature": -1}, "temperature"),
                                      ({"n": 2, "temperature": 1e-308}, "greedy"),
                                      ({"n": 2, "top_k": 0}, "top_k"), ({"n": 2, "top_k": 18}, "top_k")])
def test_bad_sampling_args(rt_model, kw, match):
    with pytest.raises(ProjectableEdgeError, match=match):
        rt_model.sample(**kw)


def test_numpy_scalar_sampling_args_equal_python_ones(rt_model):
    np.testing.assert_array_equal(rt_model.sample(np.int64(2), temperature=np.float32(0.5), top_k=np.int32(4),
                                                  seed=np.uint32(3)),
                                  rt_model.sample(2, temperature=0.5, top_k=4, seed=3))


def test_bundle_without_decode_graph_samples_by_recompute(rt_graphs, rt_build, rt_model, tmp_path):
    m = runtime.load(rt_build(tmp_path / "b", rt_graphs, variants=("fp32",), decode=False))
    assert m.decode_runner is None
    np.testing.assert_array_equal(m.sample(2, seed=4, top_k=5), rt_model.sample(2, seed=4, top_k=5))


# ----------------------------------------------------------------------------- backends


def test_tensorrt_engine_falls_back_to_ort_and_says_why(rt_graphs, rt_build, tmp_path, monkeypatch):
    engine = {"status": "built", "path": "engine/score.plan", "variant": "fp32", "tensorrt_version": "10.3",
              "command": "bash build_engine.sh"}
    b = rt_build(tmp_path / "b", rt_graphs, target="jetson-orin-nano", variants=("fp32",), engine=engine,
                 extra_files={"engine/score.plan": b"not a real engine", "build_engine.sh": b"#!/bin/sh\n"})
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, as on a CPU host
    m = runtime.load(b)
    assert m.backend["backend"] == "onnxruntime" and "tensorrt is not importable" in m.backend["reason"]
    assert m.backend["providers"] == ["CPUExecutionProvider"]
    assert {"TensorrtExecutionProvider", "CUDAExecutionProvider"} <= set(m.backend["providers_missing"])
    with pytest.raises(ProjectableEdgeError, match="TensorRT backend requested but unusable"):
        runtime.load(b, backend="tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    m = runtime.load(b)
    assert m.backend["backend"] == "onnxruntime"
    assert "built with TensorRT 10.3 but this device has 8.6.1" in m.backend["reason"]


class _FakeCuda:
    """libcudart's calls TrtRunner makes, on host memory (ctypes buffers stand in for device memory)."""

    def __init__(self):
        self.memory, self.freed, self.limit = {}, [], 1 << 20

    def cudaStreamCreate(self, ref):
        ref._obj.value = 1
        return 0

    def cudaMalloc(self, ref, size):
        if size.value > self.limit:
            return 2  # cudaErrorMemoryAllocation
        buf = ctypes.create_string_buffer(size.value)
        self.memory[ctypes.addressof(buf)] = buf
        ref._obj.value = ctypes.addressof(buf)
        return 0

    def cudaFree(self, ptr):
        self.freed.append(ptr.value)
        self.memory.pop(ptr.value, None)
        return 0

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        ctypes.memmove(dst.value, src.value, nbytes.value)
        return 0

    def cudaStreamSynchronize(self, stream):
        return 0


def _fake_tensorrt() -> types.ModuleType:
    """TensorRT 10's name-based tensor API as TrtRunner uses it, for an 'engine' computing logits = 2 * tokens; its
    execute yields the GIL between reading the inputs and writing the outputs, as a GPU's execution does."""
    import time as _time

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.TensorIOMode = types.SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.nptype = lambda dtype: dtype
    io = {"tokens": ("input", np.int64), "logits": ("output", np.float32)}

    class Context:
        def __init__(self):
            self.shapes, self.addresses = {}, {}

        def set_input_shape(self, name, shape):
            self.shapes[name] = tuple(shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr

        def get_tensor_shape(self, name):
            return self.shapes["tokens"]

        def execute_async_v3(self, stream):
            n = int(np.prod(self.shapes["tokens"]))
            tokens = np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(self.addresses["tokens"])).copy()
            _time.sleep(0.0005)
            out = np.ctypeslib.as_array((ctypes.c_float * n).from_address(self.addresses["logits"]))
            out[:] = 2 * tokens
            return True

    class Engine:
        num_io_tensors = 2
        get_tensor_name = staticmethod(lambda i: list(io)[i])
        get_tensor_mode = staticmethod(lambda name: io[name][0])
        get_tensor_dtype = staticmethod(lambda name: io[name][1])
        create_execution_context = staticmethod(Context)

    trt.Runtime = lambda logger: types.SimpleNamespace(
        deserialize_cuda_engine=lambda data: Engine() if data == b"plan" else None)
    return trt


def test_tensorrt_runner_serves_threads_one_call_at_a_time(tmp_path, monkeypatch):
    """serve's workers (and an app's threads) share one model: TrtRunner's one execution context and device
    buffers must not mix two calls (a fake TensorRT and CUDA; TensorRT itself is not installed here)."""
    from concurrent.futures import ThreadPoolExecutor

    from projectable_edge_runtime.graphs import trt_runner

    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt())
    monkeypatch.setattr(trt_runner, "_cudart", _FakeCuda)
    (tmp_path / "bad.plan").write_bytes(b"junk")
    with pytest.raises(ProjectableEdgeError, match="cannot deserialize engine .*rebuild it on this device"):
        trt_runner.TrtRunner(tmp_path / "bad.plan")
    (tmp_path / "score.plan").write_bytes(b"plan")
    runner = trt_runner.TrtRunner(tmp_path / "score.plan")
    assert runner.input_names == ["tokens"] and runner.output_names == ["logits"]

    def call(i: int) -> bool:
        tokens = np.full((1 + i % 3, 8), i, np.int64)
        out = runner.run({"tokens": tokens})["logits"]
        return out.dtype == np.float32 and out.shape == tokens.shape and bool((out == 2 * i).all())

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(call, range(400)))
    with pytest.raises(ProjectableEdgeError, match="CUDA call cudaMalloc failed"):  # past the (fake) memory
        runner.run({"tokens": np.zeros((1 << 18, 1), np.int64)})
    cuda = runner._cuda
    runner.__del__()
    assert len(cuda.freed) == len(set(cuda.freed)) and not cuda.memory  # each buffer freed once, none left


def test_deferred_engine_names_build_command(rt_graphs, rt_build, tmp_path):
    engine = {"status": "deferred", "path": "engine/score.plan", "command": "bash build_engine.sh"}
    m = runtime.load(rt_build(tmp_path / "b", rt_graphs, target="jetson", variants=("fp32",), engine=engine))
    assert "not built yet" in m.backend["reason"]
    assert f"bash {(m.bundle_dir / 'build_engine.sh').resolve()}" in m.backend["reason"]  # works from anywhere
    assert m.score(np.zeros((1, 64), np.int64)).shape == (1,)


def test_onnxruntime_target_decodes_with_its_compiled_graph(rt_graphs, rt_build, rt_model, tmp_path):
    """An ONNX Runtime target's bundle carries the selected variant's compiled decode graph (contrib kernels):
    the runtime decodes with it, to the same tokens, and with the variant's own graph for another variant
    or when the compiled one cannot run."""
    import onnx

    from projectable_edge.exporters.ort_compile import compile_onnxruntime

    _, rep = compile_onnxruntime(rt_graphs["decode"], None, tmp_path / "ort_decode")
    assert rep["fusion"]["applied"]
    files = {f"ort_decode/{n}": (tmp_path / "ort_decode" / n).read_bytes() for n in rep["files"]}
    engine = {"status": "not-applicable", "variant": "fp32", "ort": {"decode": rep["files"]}}
    b = rt_build(tmp_path / "b", rt_graphs, variants=("fp32", "int8-static"), engine=engine, extra_files=files)
    m = runtime.load(b)
    assert m.decode_runner.name == "onnxruntime:ort_decode/decode.optimized.onnx"
    assert "compile" in m.backend["decode_graph"]
    assert "Attention" in {n.op_type for n in onnx.load(str(m.decode_runner.path)).graph.node}
    for kw in ({"temperature": 0}, {"seed": 7, "top_k": 8}, {"seed": 2}):
        np.testing.assert_array_equal(m.sample(3, **kw), rt_model.sample(3, **kw))
    np.testing.assert_array_equal(m.sample(1, seed=5), rt_model.sample(1, seed=5))  # the one-row sampler path
    other = runtime.load(b, precision="int8-static")
    assert other.decode_runner.name.endswith("int8-static/decode.onnx")
    assert "no ONNX Runtime" in other.backend["decode_graph"]
    (b / "ort_decode" / "decode.optimized.onnx").write_bytes(b"broken")  # load refuses a changed file outright
    with pytest.raises(ProjectableEdgeError, match="decode.optimized.onnx"):
        runtime.load(b)
    files["ort_decode/decode.optimized.onnx"] = Path(rt_graphs["score"]).read_bytes()  # hashed, but no decode graph
    m = runtime.load(rt_build(tmp_path / "c", rt_graphs, variants=("fp32",), engine=engine, extra_files=files))
    assert m.decode_runner.name.endswith("fp32/decode.onnx") and "does not run here" in m.backend["decode_graph"]


@pytest.mark.parametrize("kw,match", [
    ({"providers": "CUDAExecutionProvider"}, r"providers must be a list of onnxruntime execution provider names"),
    ({"providers": [("CPUExecutionProvider", {})]}, "providers must be a list"),
    ({"threads": 2**31}, r"threads must be an integer in 0\.\.4096"),
    ({"threads": 1.5}, "threads must be an integer"),
    ({"tuned": 1}, "tuned must be True"),
    ({"tuned": ""}, "tuned must be True"),  # was read as the folder '.', with a warning that it is not a file
    ({"precision": ["fp32"]}, r"precision must be one name as a string.*got list"),  # was TypeError: unhashable
    ({"candidate": ["16x2/fp32"]}, r"candidate must be one name as a string.*got list"),
    ({"providers": ["CUDAExecutionProvder"]}, r"unknown execution provider\(s\) \['CUDAExecutionProvder'\].*spelling"),
])
def test_load_refuses_bad_argument_types_and_values(rt_bundle, kw, match):
    with pytest.raises(ProjectableEdgeError, match=match):
        runtime.load(rt_bundle, **kw)


@pytest.mark.parametrize("bundle", [None, b"bundles/3__x86-64-cpu", ["bundles/3__x86-64-cpu"]])
def test_load_refuses_what_is_not_a_folder_path(bundle):
    with pytest.raises(ProjectableEdgeError, match=r"the bundle must be a folder path \(str or pathlib\.Path\)"):
        runtime.load(bundle)


def test_an_app_can_filter_the_runtimes_warning_by_its_category(rt_bundle, tmp_path):
    """TunedRecordWarning (README: a stale record is ignored with one) was only importable from an internal
    module, and dir(runtime) did not list load or Model."""
    assert {"load", "Model", "validate", "benchmark", "TunedRecordWarning"} <= set(dir(runtime))
    bad = tmp_path / "r.tuned.json"
    bad.write_text("{not json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", runtime.TunedRecordWarning)
        runtime.load(rt_bundle, tuned=bad).close()


def test_a_closed_model_says_so(rt_bundle):
    with runtime.load(rt_bundle) as m:
        tokens = m.sample(1)
    for use in (lambda: m.score(tokens), lambda: m.sample(1), lambda: m.complete(tokens[:, :3]),
                lambda: runtime.validate(m)):
        with pytest.raises(ProjectableEdgeError, match="this Model is closed"):
            use()


def test_explicit_providers_are_filtered_to_available(rt_bundle):
    m = runtime.load(rt_bundle, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert m.backend["providers"] == ["CPUExecutionProvider"]
    assert m.backend["providers_missing"] == ["CUDAExecutionProvider"]


# ----------------------------------------------------------------------------- validate + benchmark


def test_validate_passes_against_the_pytorch_reference(rt_model):
    r = runtime.validate(rt_model)
    assert r["verdict"] == "pass" and r["passed"] and abs(r["delta"]) < 1e-4 and r["n_images"] == 12
    assert r["max_abs_diff_per_image"] < 1e-4 and len(r["bits_per_image"]) == 12
    assert r["expected_bits"] == rt_model.entry.accuracy.reference_bits
    assert r["tolerance"] == pytest.approx(0.0101 * r["expected_bits"])  # fp32: budget 0.01% + drift 1%


def test_a_variant_whose_accuracy_is_off_fails_even_where_onnx_runtime_agrees_with_itself(rt_graphs, rt_build,
                                                                                          tmp_path):
    """Another model's int8 graphs shipped as this model's int8-static: the bits recorded for them are their
    own (ONNX Runtime agrees with itself), but the reference is the PyTorch model's, so they fail."""
    from tiny_models import tiny_variant

    off = {"int8-static": (tiny_variant("scoring", "int8-static")[0], tiny_variant("decode", "int8-static")[0])}
    b = rt_build(tmp_path / "b", rt_graphs, files=off)
    with runtime.load(b, precision="int8") as m:
        r = runtime.validate(m)
    assert r["recorded_bits"] == pytest.approx(r["bits"], rel=1e-9)
    assert r["verdict"] == "fail" and abs(r["delta"]) > r["tolerance"]
    assert runtime.validate(runtime.load(b, precision="fp32"))["verdict"] == "pass"
    with runtime.load(b, precision="int8") as m:
        assert runtime.validate(m, tolerance=abs(r["delta"]) + 1)["verdict"] == "pass"


@pytest.mark.parametrize("tolerance", [float("nan"), float("inf"), -0.1, "0.1", [0.1], True])
def test_validate_refuses_a_tolerance_that_is_not_a_finite_number(rt_model, tolerance):
    """NaN failed every check and inf passed any (and `validate --json` printed NaN/Infinity, not JSON); a string
    or a list raised ValueError/TypeError."""
    with pytest.raises(ProjectableEdgeError, match=r"tolerance must be a finite number of bits/dim >= 0.*leave it"):
        runtime.validate(rt_model, tolerance)


@pytest.mark.parametrize("call", [runtime.validate, runtime.benchmark])
def test_validate_and_benchmark_refuse_what_is_not_a_model(rt_bundle, call):
    for wrong in (str(rt_bundle), rt_bundle, None):  # was AttributeError: no attribute 'goldens_path'
        with pytest.raises(ProjectableEdgeError, match=r"take a Model, got .*; pass runtime\.load\(BUNDLE\)"):
            call(wrong)


def test_benchmark_report(rt_bundle):
    m = runtime.load(rt_bundle)
    m.profile = dataclasses.replace(m.profile, budgets=Budgets(p99_latency_ms=1e6, memory_mb=10**6))
    r = runtime.benchmark(m, runs=8, warmup=1, batch=4, sample_runs=2)
    assert set(r["results"]) == {"score_batch1", "score_batch4", "sample_full_image"}
    for res in r["results"].values():
        assert 0 < res["min_ms"] <= res["p50_ms"] <= res["p90_ms"] <= res["p99_ms"] <= res["max_ms"]
        assert res["throughput_per_s"] > 0 and res["std_ms"] >= 0
    assert r["results"]["score_batch1"]["runs"] == 8
    assert r["verdict"] == "pass" and [c["passed"] for c in r["checks"]] == [True, True]
    assert [c["budget"] for c in r["checks"]] == [1e6, 10**6]
    assert r["peak_rss_mb"] > 10 and r["load_time_ms"] > 0 and r["providers"] == ["CPUExecutionProvider"]


def test_benchmark_fails_a_budget_it_cannot_meet(rt_bundle):
    m = runtime.load(rt_bundle)
    m.profile = dataclasses.replace(m.profile, budgets=Budgets(p99_latency_ms=1e-6, memory_mb=1))
    r = runtime.benchmark(m, runs=3, warmup=0, batch=2, sample_runs=2)
    assert r["verdict"] == "fail" and not any(c["passed"] for c in r["checks"])


def test_benchmark_of_a_tensorrt_target_without_its_engine_says_so(rt_graphs, rt_build, tmp_path, monkeypatch):
    """On the target's own architecture, a TensorRT target measured on ONNX Runtime (engine not built, no GPU) gave a
    plain PASS: these are not the target's numbers, and the note says why."""
    from projectable_edge_runtime.commands import benchmark as bench

    engine = {"status": "deferred", "path": "engine/score.plan", "command": "bash build_engine.sh"}
    m = runtime.load(rt_build(tmp_path / "b", rt_graphs, target="jetson", variants=("fp32",), engine=engine))
    monkeypatch.setattr(bench, "host_arch", lambda: m.profile.arch)  # as on a Jetson without the engine
    r = runtime.benchmark(m, runs=2, warmup=0, batch=2, sample_runs=2)
    assert r["host"]["on_target_arch"] and r["backend"] == "onnxruntime"
    assert re.match(r"measured with ONNX Runtime \(CPUExecutionProvider\), not the jetson-orin-nano target's "
                    r"TensorRT engine \(.*not built yet.*\); rerun with the engine", r["host"]["note"]), r["host"]


def test_benchmark_rejects_bad_args(rt_model):
    with pytest.raises(ProjectableEdgeError, match="'runs'"):
        runtime.benchmark(rt_model, runs=1)
    for sample_runs in (0, -2):  # an IndexError in the percentiles of no timing
        with pytest.raises(ProjectableEdgeError, match=r"'sample_runs' must be an integer >= 2"):
            runtime.benchmark(rt_model, runs=2, warmup=0, sample_runs=sample_runs)
    with pytest.raises(ProjectableEdgeError, match=r"'batch' must be an integer in 1\.\.256, got 100000"):
        runtime.benchmark(rt_model, batch=100000)  # minutes of CPU before any output


# ----------------------------------------------------------------------------- CLI


def test_cli_validate_and_benchmark_json(rt_graphs, rt_build, tmp_path, capsys):
    roomy = rt_build(tmp_path / "roomy", rt_graphs, variants=("fp32",), budgets={"p99_latency_ms": 1e6})
    tight = rt_build(tmp_path / "tight", rt_graphs, variants=("fp32",), budgets={"p99_latency_ms": 1e-6})
    assert main(["validate", str(roomy), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "pass"
    args = ["--json", "--runs", "4", "--warmup", "1", "--batch", "2", "--sample-runs", "2"]
    code = main(["benchmark", str(roomy), *args])
    r = json.loads(capsys.readouterr().out)
    assert "p99_ms" in r["results"]["score_batch1"] and r["checks"][0]["passed"]
    assert code == (0 if r["checks"][1]["passed"] else 1)  # memory: the host's, against the profile's budget
    assert main(["benchmark", str(tight), "--runs", "3", "--warmup", "0", "--batch", "2"]) == 1
    text = capsys.readouterr().out
    assert "verdict: FAIL" in text and "OVER" in text


def test_cli_sample_writes_png_and_score_reads_it(rt_bundle, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert main(["sample", str(rt_bundle), "-n", "4", "--out", str(out), "--seed", "1",
                 "--tokens-out", str(tmp_path / "t.npy")]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokens = np.load(tmp_path / "t.npy", allow_pickle=False)
    assert tokens.shape == (4, 64)
    from projectable_edge_runtime.commands.png import write_png
    m = runtime.load(rt_bundle)
    img = tmp_path / "one.png"
    write_png(img, m.decode_images(tokens)[0])
    capsys.readouterr()
    assert main(["score", str(rt_bundle), str(img), str(tmp_path / "t.npy"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    expected = m.score(tokens)
    assert r["bits_per_dim"][str(img)] == pytest.approx(expected[0], rel=1e-6)
    assert r["bits_per_dim"][f"{tmp_path / 't.npy'}[3]"] == pytest.approx(expected[3], rel=1e-6)


def test_score_reads_a_folder_as_training_does(rt_bundle, tmp_path, capsys):
    """Only the files directly inside: a sub-folder named like an image and hidden files (macOS's ._a.png beside a
    copied a.png) are skipped, as in training folders and adapt; they were read and failed as broken images."""
    np.save(tmp_path / "a.npy", np.zeros((1, 64), np.int64))
    (tmp_path / "x.png").mkdir()
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    assert main(["score", str(rt_bundle), str(tmp_path), "--json"]) == 0
    assert list(json.loads(capsys.readouterr().out)["bits_per_dim"]) == [str(tmp_path / "a.npy")]


def test_score_refuses_an_input_given_twice(rt_bundle, tmp_path, capsys):
    """The JSON keys bits/dim by input: a second one of a name was dropped from it but counted in the mean."""
    np.save(tmp_path / "a.npy", np.zeros((1, 64), np.int64))
    np.save(tmp_path / "b.npy", np.full((1, 64), 16, np.int64))
    for args in ([tmp_path / "a.npy", tmp_path / "b.npy", tmp_path / "a.npy"], [tmp_path, tmp_path / "b.npy"]):
        assert main(["score", str(rt_bundle), *map(str, args), "--json"]) == 2
        res = capsys.readouterr()
        assert json.loads(res.out)["exit_code"] == 2 and re.search(r"input '.*\.npy' is given more than once", res.err), res.err


def test_python_dash_m_runtime(rt_bundle, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "projectable_edge_runtime", "info", str(rt_bundle), "--json"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["backend"]["providers"] == ["CPUExecutionProvider"]
    bad = subprocess.run([sys.executable, "-m", "projectable_edge_runtime", "score", str(tmp_path / "nope"), "x.png"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "does not exist" in bad.stderr


def test_unexpected_errors_are_one_line_exit_1_in_both_clis(rt_bundle, monkeypatch, capsys):
    """One error boundary: a bug is one line with the --verbose hint and status 1, in both CLIs."""
    from typer.testing import CliRunner

    import projectable_edge_runtime.__main__ as device_cli

    from projectable_edge.cli import app

    def broken(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(device_cli, "load", broken)
    assert main(["info", str(rt_bundle)]) == 1
    err = capsys.readouterr().err
    assert err == "error: RuntimeError: simulated bug (rerun with --verbose for the traceback)\n"

    def broken_library(*a, **k):  # a library's message with line breaks in it is still said in one line
        raise ProjectableEdgeError("not readable (ParseError: no field 'x'.\n Available fields: ...)")

    monkeypatch.setattr(device_cli, "load", broken_library)
    assert main(["info", str(rt_bundle)]) == 2
    assert capsys.readouterr().err == "error: not readable (ParseError: no field 'x'. Available fields: ...)\n"
    monkeypatch.setattr(runtime, "load", broken)
    res = CliRunner().invoke(app, ["sample", str(rt_bundle)])
    assert res.exit_code == 1 and "simulated bug" in res.output and "--verbose" in res.output
    assert "Traceback" not in res.output
    res = CliRunner().invoke(app, ["--verbose", "sample", str(rt_bundle)])
    assert res.exit_code == 1 and "Traceback" in res.output


@pytest.mark.parametrize("argv0, prog", [("/venv/bin/projectable-edge-runtime", "projectable-edge-runtime"),
                                         ("/x/projectable_edge_runtime/__main__.py", "python -m projectable_edge_runtime")])
def test_usage_names_the_command_as_it_was_typed(argv0, prog):
    code = (f"import sys; sys.argv = [{argv0!r}, 'nosuch']; "
            "from projectable_edge_runtime.__main__ import main; sys.exit(main())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and f"(see '{prog} --help')" in res.stderr, res.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(rt_bundle):
    """`... | head -1`: the reader closes the pipe after one line; the command ends with status 0 and says nothing
    (it said 'error: BrokenPipeError' with status 1 when the pipe broke mid-output)."""
    code = ("import os, sys, runpy; r, w = os.pipe(); os.close(r); os.dup2(w, 1); "  # a reader already gone
            "sys.argv = ['x', 'schema']; from projectable_edge_runtime.__main__ import main; sys.exit(main())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    bad = ("import sys; from projectable_edge_runtime.commands.console import error_boundary\n"
           "def other_pipe(): raise BrokenPipeError(32, 'Broken pipe')  # not stdout's: still an error\n"
           "sys.exit(error_boundary(other_pipe))")
    res = subprocess.run([sys.executable, "-c", bad], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "error: BrokenPipeError" in res.stderr


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    for argv in (["validate", str(tmp_path / "missing"), "--verbose"], ["--verbose", "validate", str(tmp_path)]):
        assert main(argv) == 2  # --verbose after the command or before it, as in the host CLI
        assert "Traceback" in capsys.readouterr().err
    for argv in (["benchmark", str(tmp_path), "--runs", "abc"], ["bogus"], [], ["info", str(tmp_path), "--nope"]):
        assert main(argv) == 2  # usage errors too: one line (argparse prints usage and two more)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "--help" in err, err


def test_sample_refuses_an_image_name_other_than_png(rt_bundle, tmp_path, capsys):
    """The grid is PNG bytes: `--out grid.jpg` wrote them under a .jpg name, which viewers then misread."""
    assert main(["sample", str(rt_bundle), "-n", "2", "--out", str(tmp_path / "grid.jpg")]) == 2
    assert "name it .png" in capsys.readouterr().err and not any(tmp_path.iterdir())
    assert main(["sample", str(rt_bundle), "-n", "2", "--out", str(tmp_path / "grid.PNG")]) == 0


def test_sample_checks_every_output_before_sampling_and_writes_none_on_failure(rt_bundle, tmp_path, capsys):
    """A --tokens-out that cannot be written leaves no PNG either; a name the file system refuses, or a grid
    too large to draw, is a user error (exit 2) before any sampling; --tokens-out gets .npy as np.save adds it."""
    png = tmp_path / "grid.png"
    assert main(["sample", str(rt_bundle), "-n", "2", "--out", str(png), "--tokens-out", "/proc/none/t.npy"]) == 2
    assert not png.exists() and capsys.readouterr().err.startswith("error: ")
    assert main(["sample", str(rt_bundle), "-n", "2", "--out", str(tmp_path / ("x" * 300 + ".png"))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shorter name" in err, err
    assert main(["sample", str(rt_bundle), "-n", "2", "--scale", "100000"]) == 2
    assert "--scale" in capsys.readouterr().err
    assert main(["sample", str(rt_bundle), "-n", "2", "--cols", "0"]) == 2
    assert "--cols" in capsys.readouterr().err
    for inside in (["--out", str(rt_bundle / "x.png")], ["--out", str(png), "--tokens-out", str(rt_bundle / "t")]):
        assert main(["sample", str(rt_bundle), "-n", "2", *inside]) == 2  # the bundle would then refuse to load
        assert "is inside the bundle" in capsys.readouterr().err and not png.exists()
    assert not (rt_bundle / "x.png").exists() and main(["validate", str(rt_bundle)]) == 0
    capsys.readouterr()
    assert list(tmp_path.iterdir()) == []
    assert main(["sample", str(rt_bundle), "-n", "2", "--out", str(png), "--tokens-out", str(tmp_path / "t"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens_out"] == str(tmp_path / "t.npy") and np.load(tmp_path / "t.npy").shape[0] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "t.npy"]


def test_host_benchmark_histogram_inside_the_bundle_is_refused_before_measuring(rt_bundle_copy):
    """--histogram into the bundle replaced its figure (or added a file): the bundle then refused to load."""
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    for png in (rt_bundle_copy / "lat.png", rt_bundle_copy / "graphs" / "fp32" / "score.onnx"):
        res = CliRunner().invoke(app, ["benchmark", str(rt_bundle_copy), "--runs", "3", "--warmup", "0",
                                       "--histogram", str(png)])
        assert res.exit_code == 2 and "is inside the bundle" in res.output.replace("\n", " "), res.output
    runtime.load(rt_bundle_copy).close()  # still verifies


def test_host_benchmark_over_budget_exits_1_with_one_json_document(rt_graphs, rt_build, tmp_path):
    """A budget verdict of FAIL printed the report, then 'error: Exit: 1' (a second JSON document with --json)."""
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    tight = rt_build(tmp_path / "tight", rt_graphs, variants=("fp32",), budgets={"p99_latency_ms": 1e-6})
    args = ["benchmark", str(tight), "--runs", "3", "--warmup", "0", "--batch", "2"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 1 and json.loads(res.stdout)["verdict"] == "fail", res.output
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "verdict: FAIL" in res.stdout and "error" not in res.output, res.output


def _npy_bytes(a: np.ndarray) -> bytes:
    import io

    f = io.BytesIO()
    np.save(f, a)
    return f.getvalue()


@pytest.mark.parametrize("data,match", [
    (_npy_bytes(np.zeros((1, 8, 8), np.uint8)).replace(b"(1, 8, 8)", b"(10000000000000, 8, 8)"), "declares shape"),
    (_npy_bytes(np.zeros((0, 8, 8), np.uint8)), "holds no images"),
    (_npy_bytes(np.array([None, 1], dtype=object)), "Python objects"),
    (_npy_bytes(np.zeros((1, 64), np.int64)).replace(b"(1, 64)", b"(1, 64"), "not a .npy array"),  # a broken literal
    (_npy_bytes(np.zeros((1, 64), "V0")), "not numbers"),  # zero-width items: any shape, no data
    (_npy_bytes(np.array(5)), r"have shape \(\), expected"),  # its own shape, not (1,)
])
def test_score_checks_an_npy_file_and_stdin_before_allocating(rt_bundle, tmp_path, capsys, monkeypatch, data, match):
    """A header declaring 10**13 images (MemoryError in np.load) or an empty array is one line, exit 2."""
    (tmp_path / "x.npy").write_bytes(data)
    monkeypatch.setattr(sys, "stdin", types.SimpleNamespace(buffer=types.SimpleNamespace(read=lambda: data)))
    for source in (str(tmp_path / "x.npy"), "-"):
        assert main(["score", str(rt_bundle), source]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and re.search(match, err), err


def test_score_from_a_closed_stdin_is_a_user_error(rt_bundle, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)  # what Python sets when started with fd 0 closed
    assert main(["score", str(rt_bundle), "-"]) == 2  # was exit 1: AttributeError
    assert "this process has no stdin; pipe the array in" in capsys.readouterr().err


def test_text_output_shows_a_file_name_that_is_not_utf8(rt_bundle, tmp_path):
    """A file name from an old zip: on a UTF-8 stdout that is strict (e.g. en_US.UTF-8) printing the result was a
    UnicodeEncodeError, exit 1, after the work was done."""
    name = os.fsdecode(bytes(tmp_path) + b"/a\xff")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    for args, shown in ((["sample", "-n", "1", "--out", name + ".png", "--tokens-out", name], b"a\xef\xbf\xbd.png"),
                        (["score", name + ".npy"], b"a\xef\xbf\xbd.npy")):
        res = subprocess.run([sys.executable, "-m", "projectable_edge_runtime", args[0], str(rt_bundle), *args[1:]],
                             capture_output=True, env=env)
        assert res.returncode == 0 and shown in res.stdout, res.stderr


def test_score_refuses_an_empty_input_path(rt_bundle, capsys, monkeypatch):
    assert main(["score", str(rt_bundle), ""]) == 2  # Path("") would be the current folder
    assert "input path is empty" in capsys.readouterr().err
    assert main(["info", ""]) == 2 and "empty path" in capsys.readouterr().err  # a bundle argument too, in the CLI
    monkeypatch.chdir(rt_bundle)  # where "" would load: the bundle itself
    from projectable_edge_runtime.commands.tune import tune

    for api in (runtime.load, tune):
        with pytest.raises(ProjectableEdgeError, match="the bundle path is empty"):
            api("")


@pytest.mark.parametrize("goldens,match", [
    (os.urandom(4096), r"is not a \.npz archive"),
    ({"tokens": np.zeros((0, 64), np.int64), "ref_bits": np.zeros(0)}, "holds no golden sequences"),
    ({"tokens": np.zeros((2, 64), np.int64)}, "'tokens' and 'ref_bits'"),
])
def test_validate_refuses_goldens_it_cannot_use(rt_bundle_copy, capsys, goldens, match):
    """Goldens that pass integrity (hash recomputed) but hold random bytes or no sequences: exit 2, named."""
    path = rt_bundle_copy / "goldens.npz"
    if isinstance(goldens, bytes):
        path.write_bytes(goldens)
    else:
        np.savez(path, **goldens)

    def rehash(m):
        m["files"]["goldens.npz"].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                                         bytes=path.stat().st_size)

    _edit_manifest(rt_bundle_copy, rehash)
    assert main(["validate", str(rt_bundle_copy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(match, err), err
