"""Compilation for targets: TensorRT (deferred here) with build_engine.sh, the static TensorRT
check, and ONNX Runtime's optimized graph + ORT format."""
import json
import shutil
import subprocess
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.compile import compile_for_target
from projectable_edge_runtime.bundle.manifest import sha256_file
from projectable_edge.exporters.ort_compile import compile_onnxruntime, ort_decode_graph
from projectable_edge.exporters.onnx_io import load_onnx
from projectable_edge.exporters.spec import read_spec
from projectable_edge.exporters.tensorrt import TensorRTSettings, compile_tensorrt
from projectable_edge_runtime.graphs.contract import GraphKind, check_io, graph_logits, kind_of
from projectable_edge_runtime.graphs.runners import OrtRunner, ort_session
from projectable_edge_runtime.graphs.sampler import sample_kv
from tiny_models import TINY, peaked_export, sample_graph, tiny_export, tiny_variant, without_softmax
from projectable_edge.exporters.trt_check import check_tensorrt_compat

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except ImportError:
    HAVE_TRT = False

DLA = TensorRTSettings(fp16=True, int8=True, dla_core=0, workspace_mb=512, min_shapes={"batch": 1, "seq": 1},
                       opt_shapes={"batch": 4, "seq": 64}, max_shapes={"batch": 16, "seq": 64},
                       tensorrt_version="10.3", target="test-orin")


@pytest.fixture(scope="module")
def ex():
    return tiny_export()


@pytest.mark.skipif(HAVE_TRT, reason="checks the deferred path; TensorRT is installed here")
def test_tensorrt_deferred_script_carries_profile_flags(tmp_path, ex):
    qdq, _ = tiny_variant("scoring", "int8-static")
    artifact, rep = compile_tensorrt(qdq, DLA, tmp_path / "trt")
    assert rep["status"] == "deferred" and "not importable" in rep["reason"]
    assert artifact == tmp_path / "trt" / "build_engine.sh" and artifact.stat().st_mode & 0o111
    script = artifact.read_text()
    assert "--fp16" not in rep["command"] and "--int8" not in rep["command"] and rep["typing"] == "strong"
    for flag in ("--onnx=scoring_int8-static_int8.onnx", "--saveEngine=scoring_int8-static_int8.plan",
                 "--stronglyTyped", "--useDLACore=0", "--allowGPUFallback", "--memPoolSize=workspace:512M",
                 "--minShapes=tokens:1x1", "--optShapes=tokens:4x64", "--maxShapes=tokens:16x64"):
        assert flag in script and flag in rep["command"], flag
    assert 'EXPECTED_TRT="10.3"' in script
    subprocess.run(["bash", "-n", str(artifact)], check=True)  # the script at least parses
    assert (tmp_path / "trt" / qdq.name).read_bytes() == qdq.read_bytes()  # self-contained folder
    saved = json.loads((tmp_path / "trt" / "compile_report.json").read_text())
    assert saved["status"] == "deferred" and saved["files"][qdq.name]["sha256"] == sha256_file(qdq)


@pytest.mark.skipif(HAVE_TRT, reason="checks the deferred path")
def test_build_engine_script_without_or_with_a_failing_trtexec_fails_cleanly_and_writes_nothing(tmp_path, ex):
    folder = tmp_path / "sp ace" / "trt"
    artifact, _ = compile_tensorrt(ex.scoring, DLA, folder)
    before = sorted(p.name for p in folder.iterdir())
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(tmp_path / "no-trtexec")}
    res = subprocess.run(["bash", str(artifact)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "error: trtexec not found" in res.stderr and "TRTEXEC=" in res.stderr
    assert sorted(p.name for p in folder.iterdir()) == before
    failing = tmp_path / "trtexec"
    failing.write_text("#!/bin/sh\necho 'cannot build'\nexit 3\n")
    failing.chmod(0o755)
    res = subprocess.run(["bash", str(artifact)], cwd=tmp_path, env={**env, "TRTEXEC": str(failing)},
                         capture_output=True, text=True)
    assert res.returncode == 3 and "cannot build" in res.stdout and "error: trtexec failed (exit 3" in res.stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # no log, no plan: the bundle still verifies


def test_bundle_build_script_refuses_a_python_that_cannot_record_before_building_anything(tmp_path):
    """README's device steps put the runtime in a venv; with the default python3 (or a venv without TensorRT)
    the record step failed after trtexec, leaving plans without records: a bundle that no longer loads."""
    from projectable_edge.pipeline.build import _BUILD_SCRIPT

    bundle = tmp_path / "b"
    for folder, plan in (("engine", "scoring.plan"), ("engine_decode", "decode.plan")):
        (bundle / folder).mkdir(parents=True)
        (bundle / folder / "build_engine.sh").write_text(f'cd "$(dirname "$0")"; touch {plan}\n')
    (bundle / "build_engine.sh").write_text(_BUILD_SCRIPT)
    venv = tmp_path / "pe" / "bin"
    venv.mkdir(parents=True)
    (venv / "python").write_text("#!/bin/sh\necho \"No module named 'projectable_edge_runtime'\" >&2\nexit 1\n")
    (venv / "python").chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": "pe/bin/python"}
    res = subprocess.run(["bash", "b/build_engine.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "PYTHON=" in res.stderr and "nothing was built" in res.stderr
    assert not list(bundle.rglob("*.plan"))
    (venv / "python").write_text('#!/bin/sh\n[ "$1" = -c ] && exit 0\necho "recorded $*" > "$PWD/recorded"\n')
    # a relative PYTHON still names the venv after the script's cd
    res = subprocess.run(["bash", "b/build_engine.sh"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0 and len(list(bundle.rglob("*.plan"))) == 2
    assert "engine_record ." in (bundle / "recorded").read_text()


@pytest.mark.skipif(HAVE_TRT, reason="checks the deferred path")
def test_tensorrt_fp32_graph_gets_no_int8_and_decode_gets_cache_shapes(tmp_path, ex):
    _, rep = compile_tensorrt(ex.scoring, DLA, tmp_path / "a")
    assert "--int8" not in rep["command"] and "--fp16" in rep["command"] and "no QDQ" in rep["note"]
    gpu = TensorRTSettings(fp16=False, dla_core=-1, tensorrt_version="10.3")
    _, rep = compile_tensorrt(ex.decode, gpu, tmp_path / "b")
    cmd = rep["command_line"]
    L, H, hd = TINY.n_layer, TINY.n_head, TINY.head_dim
    assert f"--minShapes=token:1x1,past_keys:{L}x1x{H}x0x{hd},past_values:{L}x1x{H}x0x{hd}" in cmd
    assert f"past_keys:{L}x32x{H}x63x{hd}" in cmd
    assert "--fp16" not in cmd and "--useDLACore" not in cmd and "--allowGPUFallback" not in cmd


def test_compile_by_profile_name_dispatches_on_backend(tmp_path, ex):
    _, rep = compile_for_target(ex.scoring, "jetson", tmp_path / "jetson")
    assert rep["backend"] == "tensorrt" and rep["target"] == "jetson-orin-nano"
    assert rep["status"] == ("built" if HAVE_TRT else "deferred")
    assert "--memPoolSize=workspace:1024M" in rep["command"] and "--maxShapes=tokens:32x64" in rep["command"]
    assert rep["tensorrt_version_expected"] == "10.3" and rep["trt_check"]["ok"]
    _, rep = compile_for_target(ex.scoring, "x86-64-cpu", tmp_path / "cpu")
    assert rep["backend"] == "onnxruntime" and rep["status"] == "built"


def _graph_with(op: str, domain: str = "") -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    node = helper.make_node(op, ["x"], ["y"], name=f"my_{op.lower()}", domain=domain)
    opsets = [helper.make_opsetid("", 18)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)


def test_trt_check_flags_unsupported_and_custom_ops():
    rep = check_tensorrt_compat(_graph_with("Det"))
    assert not rep["ok"] and rep["counts"]["error"] == 1
    (p,) = [p for p in rep["problems"] if p["severity"] == "error"]
    assert (p["code"], p["node"], p["op_type"]) == ("unsupported_op", "my_det", "Det")
    rep = check_tensorrt_compat(_graph_with("FancyOp", "com.example"))
    assert [p["code"] for p in rep["problems"] if p["severity"] == "error"] == ["custom_domain"]
    old = check_tensorrt_compat(_graph_with("Abs"), tensorrt_version="8.6")  # parses opset <= 17 only
    assert [p["code"] for p in old["problems"]] == ["opset"] and old["opset_range"] == [9, 17]
    assert check_tensorrt_compat(_graph_with("Abs"))["ok"]
    json.dumps(rep)


def test_trt_check_on_exported_and_quantized_graphs(ex):
    for path in (ex.scoring, ex.decode, tiny_variant("scoring", "int8-static")[0],
                 tiny_variant("decode", "fp16")[0]):
        rep = check_tensorrt_compat(path, "10.3")
        assert rep["ok"], rep["problems"]
    rep = check_tensorrt_compat(ex.scoring)
    assert [p["code"] for p in rep["problems"] if p["severity"] == "warning"] == ["int64_io"]
    dyn = check_tensorrt_compat(tiny_variant("scoring", "int8-dynamic")[0])
    assert not dyn["ok"] and {"MatMulInteger", "DynamicQuantizeLinear"} <= {p["op_type"] for p in dyn["problems"]}
    asym = check_tensorrt_compat(tiny_variant("scoring", "int8-static", "uint8")[0])
    assert not asym["ok"] and {"qdq_not_int8", "qdq_zero_point"} <= {p["code"] for p in asym["problems"]}


def test_trt_check_flags_dangling_quantize():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.INT8, [2, 2])
    inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
    q = helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="q_alone")
    m = helper.make_model(helper.make_graph([q], "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    rep = check_tensorrt_compat(m)
    assert [p["code"] for p in rep["problems"] if p["severity"] == "error"] == ["qdq_dangling_q"]


def test_compile_refuses_graph_tensorrt_cannot_parse(tmp_path):
    dyn, _ = tiny_variant("scoring", "int8-dynamic")
    with pytest.raises(ProjectableEdgeError, match="MatMulInteger"):
        compile_tensorrt(dyn, DLA, tmp_path / "x")
    assert not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("graph", ["scoring", "decode"])
def test_onnxruntime_compile_writes_loadable_optimized_and_ort_format(tmp_path, ex, graph):
    src = getattr(ex, graph)
    artifact, rep = compile_onnxruntime(src, None, tmp_path / "ort")
    d = tmp_path / "ort"
    assert artifact == d / f"{graph}.ort"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"{graph}.optimized.onnx", f"{graph}.ort", f"{graph}.required_operators.config", "compile_report.json"])
    assert all(v < 1e-4 for v in rep["max_abs_diff"].values())
    assert str(tmp_path) not in (d / f"{graph}.required_operators.config").read_text()  # no temp paths shipped
    assert "MatMul" in (d / f"{graph}.required_operators.config").read_text()
    assert artifact.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier of the ORT format
    if graph == "scoring":  # the .ort really runs and scores like the source graph
        x = ex.heldout[:4]
        got = ort_session(artifact).run(None, {"tokens": x})[0]
        np.testing.assert_allclose(got, ort_session(src).run(None, {"tokens": x})[0], atol=1e-4)
    assert rep["files"][f"{graph}.ort"]["sha256"] == sha256_file(artifact)


def _kernels(path, tmp_path) -> dict:
    """{op_type: count} of a graph after ONNX Runtime's own optimizations (what a session runs)."""
    ort_session(path, threads=1, save_optimized=tmp_path / "k.onnx")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "k.onnx")).graph.node]
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("which", ["tiny", "peaked"])
def test_onnxruntime_decode_graph_is_rebuilt_with_contrib_kernels(tmp_path, ex, which):
    """An ONNX Runtime target's decode graph: one Attention kernel per layer reading and writing its own cache,
    no cache copied outside them, under half the kernels, the exported graph's outputs (layer by layer) for any
    batch and past length, its own I/O in its spec, and the same sampled tokens as the scoring graph."""
    src = ex if which == "tiny" else peaked_export()
    _, rep = compile_onnxruntime(src.decode, None, tmp_path / "ort")
    assert rep["fusion"]["applied"], rep["fusion"]
    opt = tmp_path / "ort" / "decode.optimized.onnx"
    fused, plain = _kernels(opt, tmp_path), _kernels(src.decode, tmp_path)
    assert fused.get("Attention") == TINY.n_layer and "Softmax" not in fused and "LayerNormalization" not in fused
    assert "Concat" not in fused and "Split" not in fused and fused.get("Gather") == 2, fused  # the embeddings only
    # 7 per layer + 6 (position, embeddings, first norm, head) against about 25 per layer for the standard-op graph
    assert sum(fused.values()) <= 7 * TINY.n_layer + 6 < 0.5 * sum(plain.values()), (fused, plain)
    L = TINY.n_layer
    a, b = ort_session(src.decode, threads=1), ort_session(opt, threads=1)
    assert [i.name for i in b.get_inputs()] == ["token"] + [f"past_kv_{i}" for i in range(L)]
    assert [o.name for o in b.get_outputs()] == ["logits"] + [f"present_kv_{i}" for i in range(L)]
    assert [t.name for t in read_spec(onnx.load(str(opt))).inputs] == [i.name for i in b.get_inputs()]
    rng = np.random.default_rng(1)
    for batch, past in ((1, 0), (2, 1), (3, TINY.block_size - 1)):
        cache = rng.standard_normal((L, batch, TINY.n_head, past, TINY.head_dim)).astype(np.float32)
        feed = {"token": rng.integers(0, TINY.vocab_size + 1, (batch, 1)), "past_keys": cache,
                "past_values": -cache}
        want = dict(zip(["logits", "present_keys", "present_values"], a.run(None, feed)))
        want = {"logits": want["logits"], **{f"present_kv_{i}": np.stack([want["present_keys"][i],
                                                                         want["present_values"][i]])
                                             for i in range(L)}}
        got = b.run(None, {"token": feed["token"], **{f"past_kv_{i}": np.stack([cache[i], -cache[i]])
                                                      for i in range(L)}})
        for name, g in zip([o.name for o in b.get_outputs()], got):
            assert g.shape == want[name].shape
            np.testing.assert_allclose(g, want[name], rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want[name]).max())))
    for seed, temperature in ((0, 0.0), (3, 1.0)):
        np.testing.assert_array_equal(sample_graph(opt, 3, seed, temperature), sample_graph(src.scoring, 3, seed,
                                                                                             temperature))


def test_the_decode_contract_speaks_per_layer_caches_and_names_what_is_missing(tmp_path, ex):
    """The runtime's loops take the compiled graph's per-layer caches as they take the exported keys and values:
    a teacher-forced rollout gives the exported graph's logits; a graph missing a cache fails when opened."""
    compile_onnxruntime(ex.decode, None, tmp_path / "ort")
    compiled = OrtRunner(tmp_path / "ort" / "decode.optimized.onnx", threads=1)
    exported = OrtRunner(ex.decode, threads=1)
    assert kind_of(compiled.input_names) is kind_of(exported.input_names) is GraphKind.DECODE
    check_io(compiled, GraphKind.DECODE)
    layout, tokens = read_spec(onnx.load(str(ex.decode))).layout, ex.heldout[:3]
    want = graph_logits(exported, GraphKind.DECODE, layout, tokens)
    np.testing.assert_allclose(graph_logits(compiled, GraphKind.DECODE, layout, tokens), want, rtol=1e-4, atol=1e-4)
    for kw in ({"seed": 3}, {"seed": 4, "max_batch": 2, "prefix": tokens[:, :5]}):  # in chunks, after a prefix
        np.testing.assert_array_equal(sample_kv(compiled, layout, 3, TINY.block_size, **kw),
                                      sample_kv(exported, layout, 3, TINY.block_size, **kw))
    L = TINY.n_layer
    short = types.SimpleNamespace(name="g", input_names=compiled.input_names,
                                  output_names=[n for n in compiled.output_names if n != f"present_kv_{L - 1}"])
    with pytest.raises(ProjectableEdgeError, match=f"present_kv_{L - 1}"):
        check_io(short, GraphKind.DECODE)
    with pytest.raises(ProjectableEdgeError, match="neither a scoring graph"):
        kind_of(["token", "past_kv_0", "past_keys"])


def test_onnxruntime_compile_leaves_other_graphs_to_onnxruntime(tmp_path, ex):
    """Only the exporter's fp32 decode graph is rebuilt: quantized graphs and scoring graphs are optimized as they
    are, and the compile report says why."""
    for src, reason in ((tiny_variant("decode", "int8-static")[0], "structure"),
                        (tiny_variant("decode", "fp16")[0], "fp32"), (ex.scoring, "scoring")):
        _, rep = compile_onnxruntime(src, None, tmp_path / src.stem)
        assert not rep["fusion"]["applied"] and reason in rep["fusion"]["reason"], rep["fusion"]
        assert "com.microsoft::Attention" not in rep["op_types"]
    _, rep = compile_onnxruntime(ex.decode, {"fuse_decode": False}, tmp_path / "off")
    assert not rep["fusion"]["applied"]
    model = onnx.load(str(ex.decode))
    model.graph.node.remove(next(n for n in model.graph.node if n.op_type == "Softmax"))
    assert ort_decode_graph(model)[0] is None  # not the exporter's structure: no rebuilt graph


def test_compile_errors(tmp_path, ex):
    (tmp_path / "taken").mkdir()
    with pytest.raises(ProjectableEdgeError, match="already exists"):
        compile_onnxruntime(ex.scoring, None, tmp_path / "taken")
    with pytest.raises(ProjectableEdgeError, match="unknown target"):
        compile_for_target(ex.scoring, "toaster-9000", tmp_path / "t")
    junk = tmp_path / "junk.onnx"
    junk.write_text("not onnx at all")
    with pytest.raises(ProjectableEdgeError, match="ONNX"):
        compile_for_target(junk, "x86-64-cpu", tmp_path / "j")
    with pytest.raises(ProjectableEdgeError, match="optimized_level"):
        compile_onnxruntime(ex.scoring, {"optimized_level": "max"}, tmp_path / "l")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "taken"]
    # overwrite=True replaces an existing output in one step
    shutil.rmtree(tmp_path / "taken")
    compile_onnxruntime(ex.scoring, None, tmp_path / "taken")
    _, rep = compile_onnxruntime(ex.scoring, {"optimized_level": "basic"}, tmp_path / "taken", overwrite=True)
    assert rep["levels"]["optimized_onnx"] == "basic"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "taken"]


def test_a_graph_that_gives_nan_is_refused_and_never_agrees_with_its_source(tmp_path, ex):
    """The optimized graphs' check took the worst difference with Python's max, which drops a NaN: a compiled graph
    giving NaN where its source does not 'differed' by 0.0 and passed; a source giving NaN compiled as 'agreeing'."""
    from projectable_edge.exporters.ort_compile import _smoke

    nan = without_softmax(ex.scoring, tmp_path / "nan.onnx")
    assert np.isnan(_smoke(nan, ex.scoring, read_spec(load_onnx(ex.scoring))))
    with pytest.raises(ProjectableEdgeError, match="nan.onnx gives non-finite logits on fixed inputs: the graph is "
                                                   "broken; export the model again"):
        compile_onnxruntime(nan, None, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_cli_compile_json(tmp_path, ex):
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    r = CliRunner().invoke(app, ["compile", str(ex.scoring), "--target", "jetson", "--out", str(tmp_path / "o"),
                                 "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["artifact"].endswith("build_engine.sh" if not HAVE_TRT else "scoring.plan")
    bad = CliRunner().invoke(app, ["compile", str(ex.scoring), "--target", "nope", "--out", str(tmp_path / "n")])
    assert bad.exit_code == 2 and "unknown target" in bad.output
