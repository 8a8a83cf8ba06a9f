"""ONNX export: graph contract, parity with PyTorch, KV-cache decoding, atomic outputs, CLI."""
import json
import re

import numpy as np
import onnx
import pytest
import torch

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.onnx_export import ExportSettings, export_onnx
from projectable_edge.exporters.onnx_io import check_tokens, load_onnx, tokens_sha256
from projectable_edge.exporters.parity import check_parity
from projectable_edge.exporters.spec import ExportSpec, read_spec
from projectable_edge_runtime.graphs.runners import ort_session
from tiny_models import TINY, sample_graph, tiny_export, tiny_trained_model


@pytest.fixture(scope="module")
def ex():
    return tiny_export()


def test_trained_fixture_is_far_from_uniform(ex):
    # quantization tests are only meaningful if the model's predictions are peaked
    bits = ex.report["graphs"]["scoring"]["parity"]["bits_per_dim"]["pytorch"]
    assert bits < 0.5 * np.log2(TINY.vocab_size)


def test_graphs_have_the_declared_contract(ex):
    for graph, path in (("scoring", ex.scoring), ("decode", ex.decode)):
        model = load_onnx(path)  # onnx.checker full check inside
        spec = read_spec(model)
        assert spec.graph == graph and spec.opset >= 17
        assert spec.to_dict() == ex.report["graphs"][graph]["spec"]
        assert ExportSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
        assert len(model.graph.value_info) > 0  # shapes were inferred
        assert not any(n.metadata_props for n in model.graph.node)  # no stack traces / local paths shipped
    s = read_spec(load_onnx(ex.scoring))
    assert [(t.name, t.dtype, t.shape) for t in s.inputs] == [("tokens", "int64", ("batch", "seq"))]
    assert [(t.name, t.dtype, t.shape) for t in s.outputs] == [("logits", "float32", ("batch", "seq", 17))]
    d = read_spec(load_onnx(ex.decode))
    L, H, hd = TINY.n_layer, TINY.n_head, TINY.head_dim
    cache = (L, "batch", H, "past", hd)
    assert [(t.name, t.shape) for t in d.inputs] == [("token", ("batch", 1)), ("past_keys", cache),
                                                     ("past_values", cache)]
    assert [(t.name, t.shape) for t in d.outputs] == [
        ("logits", ("batch", 17)), ("present_keys", (L, "batch", H, "past + 1", hd)),
        ("present_values", (L, "batch", H, "past + 1", hd))]
    assert d.bos_id == TINY.vocab_size and d.to_dict()["inputs"][1]["dynamic_axes"] == {"1": "batch", "3": "past"}


def test_scoring_parity_meets_acceptance(ex):
    p = ex.report["graphs"]["scoring"]["parity"]
    assert p["ok"] and p["outputs"]["logits"]["max_abs"] < 1e-4
    assert {c["case"] for c in p["cases"]} >= {"heldout", "batch1_full_length", "single_token"}
    assert p["tokens"]["sha256"] == tokens_sha256(ex.heldout)
    b = p["bits_per_dim"]
    assert abs(b["onnx"] - b["pytorch"]) < 1e-4
    assert len(p["lines"]) == 2 and "max abs" in p["lines"][0]


def test_decode_parity_covers_every_output(ex):
    p = ex.report["graphs"]["decode"]["parity"]
    assert p["ok"] and set(p["outputs"]) == {"logits", "present_keys", "present_values"}
    assert all(o["max_abs"] < 1e-4 for o in p["outputs"].values())
    # teacher-forced decode scores the held-out set exactly like the one-pass scoring graph
    assert p["bits_per_dim"]["onnx"] == pytest.approx(
        ex.report["graphs"]["scoring"]["parity"]["bits_per_dim"]["onnx"], abs=1e-5)


@pytest.mark.parametrize("batch,past", [(1, 0), (3, 0), (2, 5), (1, TINY.block_size - 1)])
def test_decode_graph_runs_any_past_length_in_ort(ex, batch, past):
    sess = ort_session(ex.decode)
    g = torch.Generator().manual_seed(past)
    tok = torch.randint(0, TINY.vocab_size + 1, (batch, 1), generator=g)
    pk = torch.randn(TINY.n_layer, batch, TINY.n_head, past, TINY.head_dim, generator=g)
    pv = torch.randn(pk.shape, generator=g)
    logits, k, v = sess.run(None, {"token": tok.numpy(), "past_keys": pk.numpy(), "past_values": pv.numpy()})
    assert logits.shape == (batch, TINY.vocab_size) and k.shape[3] == past + 1 and v.shape == k.shape
    with torch.no_grad():
        ref = ex.model.decode_step(tok, pk, pv)
    for got, want in zip((logits, k, v), ref):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)


def test_scoring_graph_accepts_dynamic_batch_and_length(ex):
    sess = ort_session(ex.scoring)
    for shape in [(1, 1), (5, 17), (2, TINY.block_size)]:
        x = ex.heldout[: shape[0], : shape[1]]
        assert sess.run(None, {"tokens": x})[0].shape == (*shape, TINY.vocab_size)


@pytest.mark.parametrize("greedy,seed", [(True, 0), (False, 0), (False, 7)])
def test_kv_cache_sampling_equals_full_recompute(ex, greedy, seed):
    temperature = 0.0 if greedy else 1.0
    dec = sample_graph(ex.decode, 6, seed=seed, temperature=temperature)
    full = sample_graph(ex.scoring, 6, seed=seed, temperature=temperature)
    assert dec.shape == (6, TINY.block_size)
    np.testing.assert_array_equal(dec, full)
    if not greedy:  # seeded sampling really samples: another seed gives other images
        assert not np.array_equal(dec, sample_graph(ex.decode, 6, seed=seed + 1))


def test_parity_error_lists_every_failing_output(ex):
    other = tiny_trained_model(steps=5, seed=1)  # a different model: every output disagrees
    lines = []
    with pytest.raises(ProjectableEdgeError) as e:
        check_parity(ex.decode, other, ex.heldout[:4], log=lines.append)
    msg = str(e.value)
    for name in ("logits", "present_keys", "present_values", "bits_per_dim"):
        assert name in msg
    assert len(lines) == 4 and sum("FAILED" in x for x in lines) == 4


def test_failed_export_leaves_nothing_and_existing_output_is_kept(tmp_path, ex):
    out = tmp_path / "exp"
    strict = ExportSettings(graphs=("scoring",), tolerances={"logits": {"atol": 0.0, "rtol": 0.0}})
    with pytest.raises(ProjectableEdgeError, match="parity check"):
        export_onnx(ex.model, strict, out, heldout=ex.heldout[:4], log=lambda s: None)
    assert list(tmp_path.iterdir()) == []  # no folder, no temp leftovers
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ProjectableEdgeError, match="already exists"):
        export_onnx(ex.model, ExportSettings(graphs=("scoring",)), out, log=lambda s: None)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_export_in_a_forked_child_gives_the_same_files(tmp_path, ex, monkeypatch):
    # the fixture exported in one process with a forked child for the decode graph (Linux, 2+ cores); one core
    # takes the serial path, which must give the same bytes
    import projectable_edge.exporters.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export.os, "cpu_count", lambda: 1)
    serial = tmp_path / "serial"
    export_onnx(ex.model, None, serial, heldout=ex.heldout, log=lambda s: None)
    for f in ("scoring.onnx", "decode.onnx"):
        assert (serial / f).read_bytes() == (ex.scoring.parent / f).read_bytes(), f


def test_a_failed_child_export_is_a_clear_error(tmp_path, ex, monkeypatch):
    import projectable_edge.exporters.onnx_export as onnx_export

    real = onnx_export._export_one

    def decode_fails(model, graph, settings):
        if graph == "decode":
            raise RuntimeError("boom")
        return real(model, graph, settings)

    if not onnx_export.sys.platform.startswith("linux"):
        pytest.skip("graphs are exported in forked children on Linux only")
    monkeypatch.setattr(onnx_export.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(onnx_export, "_export_one", decode_fails)
    with pytest.raises(ProjectableEdgeError, match="could not export the decode graph .RuntimeError: boom"):
        export_onnx(ex.model, ExportSettings(parity=False), tmp_path / "out", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_a_stuck_child_export_is_redone_in_the_parent(tmp_path, ex, monkeypatch):
    import time

    import projectable_edge.exporters.onnx_export as onnx_export

    if not onnx_export.sys.platform.startswith("linux"):
        pytest.skip("graphs are exported in forked children on Linux only")
    real, parent = onnx_export._export_one, onnx_export.os.getpid()

    def child_hangs(model, graph, settings):
        if onnx_export.os.getpid() != parent:
            time.sleep(60)
        return real(model, graph, settings)

    monkeypatch.setattr(onnx_export.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(onnx_export, "CHILD_PATIENCE_S", 0.0)
    monkeypatch.setattr(onnx_export, "CHILD_PATIENCE_X", 0.0)
    monkeypatch.setattr(onnx_export, "_export_one", child_hangs)
    export_onnx(ex.model, ExportSettings(parity=False), tmp_path / "out", log=lambda s: None)
    assert (tmp_path / "out" / "decode.onnx").read_bytes() == (ex.scoring.parent / "decode.onnx").read_bytes()


def test_a_forked_export_ends_when_its_parent_is_killed(tmp_path):
    """A generate killed while exporting (SIGKILL, the OOM killer) left its forked export child blocked for ever
    sending its graph down a pipe nobody would read: the child held the pipe's read end too. It now ends."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not sys.platform.startswith("linux"):
        pytest.skip("graphs are exported in forked children on Linux only")
    script = """
import os, signal
import projectable_edge.exporters.onnx_export as oe
from tiny_models import SMALL, peaked_model
real, parent = oe._export_one, os.getpid()
def killed(model, graph, settings):
    if os.getpid() == parent:  # the child exports the decode graph meanwhile
        print(*(p.pid for p in oe.mp.active_children()), flush=True)
        os.kill(parent, signal.SIGKILL)
    return real(model, graph, settings)
oe.os.cpu_count, oe._export_one = (lambda: 2), killed
oe._export_all(peaked_model(SMALL), oe.ExportSettings(parity=False))  # a graph over a pipe's 64 KB
"""
    tests = str(Path(__file__).parent)
    with open(tmp_path / "pids", "w") as f:  # not a pipe: a child left alive would hold it open
        p = subprocess.run([sys.executable, "-c", script], stdout=f, stderr=subprocess.DEVNULL, timeout=300,
                           env={**os.environ, "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", "")})
    pids = [int(x) for x in (tmp_path / "pids").read_text().split()]
    assert p.returncode == -signal.SIGKILL and pids

    def alive(pid):
        try:
            return "\tZ" not in Path(f"/proc/{pid}/status").read_text().split("State:")[1].splitlines()[0]
        except (OSError, IndexError):
            return False

    deadline = time.monotonic() + 120
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left


def test_bad_inputs_are_clear_errors(tmp_path, ex):
    with pytest.raises(ProjectableEdgeError, match="not a readable ONNX"):
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x08\x07garbage\xff\xfe" * 10)
        load_onnx(bad)
    with pytest.raises(ProjectableEdgeError, match="no ONNX graph|not a readable ONNX"):
        txt = tmp_path / "notes.onnx"
        txt.write_text("hello, not onnx")
        load_onnx(txt)
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(ex.scoring.read_bytes()[:5000])
    with pytest.raises(ProjectableEdgeError):
        load_onnx(trunc)
    with pytest.raises(ProjectableEdgeError, match="not found"):
        load_onnx(tmp_path / "missing.onnx")
    with pytest.raises(ProjectableEdgeError, match="vocabulary"):
        check_tokens(np.full((2, 4), 99), 17, 64)
    with pytest.raises(ProjectableEdgeError, match="at most"):
        check_tokens(np.zeros((2, 65), np.int64), 17, 64)
    with pytest.raises(ProjectableEdgeError, match="opset"):
        ExportSettings(opset=13)
    with pytest.raises(ProjectableEdgeError, match="ExportableModel"):
        export_onnx(torch.nn.Linear(2, 2), None, tmp_path / "x")


def test_a_graph_edited_after_export_is_refused_by_every_step(tmp_path, ex):
    """An output renamed or the batch axis made static (the spec in the graph's metadata left as it was) used to
    reach parity, quantize and compile as a KeyError 'logits' or a shape error from inside onnxruntime."""
    from projectable_edge.exporters.compile import compile_for_target
    from projectable_edge.exporters.quantize import quantize

    renamed, static = load_onnx(ex.scoring), load_onnx(ex.decode)
    for n in renamed.graph.node:
        n.output[:] = ["scores" if o == "logits" else o for o in n.output]
    renamed.graph.output[0].name = "scores"
    static.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    for name, model, line in (("renamed", renamed, "only in the graph: scores float32"),
                              ("static", static, "only in the graph: token int64[2, 1]")):
        path = tmp_path / f"{name}.onnx"
        onnx.save(model, path)
        for step in (lambda: check_parity(path, ex.model, ex.heldout[:4]),
                     lambda: quantize(path, "fp16", tmp_path / f"{name}.fp16.onnx", heldout=ex.heldout[:4]),
                     lambda: compile_for_target(path, "x86-64-cpu", tmp_path / f"{name}.ort"),
                     lambda: compile_for_target(path, "jetson", tmp_path / f"{name}.trt")):
            with pytest.raises(ProjectableEdgeError, match=rf"edited after export.*{re.escape(line)}.*export the"):
                step()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["renamed.onnx", "static.onnx"]


def test_parity_against_a_model_of_another_shape_is_a_clear_error(ex):
    """A decode graph checked against another size's model failed inside torch ('Sizes of tensors must match')."""
    from tiny_models import SMALL, peaked_model

    for path in (ex.scoring, ex.decode):
        with pytest.raises(ProjectableEdgeError, match=rf"{path.name} was not exported from this model: it has "
                                                       r"n_layer 2 \(the model's 4\), n_head 2 \(the model's 4\)"):
            check_parity(path, peaked_model(SMALL), ex.heldout[:4])


def test_cli_export_json(tmp_path, ex):
    from typer.testing import CliRunner

    from projectable_edge.cli import app
    from projectable_edge.project import save_projected

    stem = tmp_path / "proj"
    save_projected(stem, ex.model, {"model": TINY.to_dict(), "task": "synthetic"})
    np.save(tmp_path / "held.npy", ex.heldout[:8])
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(stem), "--out", str(tmp_path / "out"), "--heldout",
                            str(tmp_path / "held.npy"), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["graphs"]["scoring"]["parity"]["ok"] and (tmp_path / "out" / "decode.onnx").is_file()
    again = runner.invoke(app, ["export", str(stem), "--out", str(tmp_path / "out")])
    assert again.exit_code == 2 and "already exists" in again.output
    assert onnx.load(str(tmp_path / "out" / "scoring.onnx")).graph.input[0].name == "tokens"
