"""Quantization: FP16 / INT8 dynamic / INT8 static QDQ variants, their structure, accuracy and errors."""
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.onnx_io import tokens_sha256
from projectable_edge.exporters.quantize import QuantizeSettings, quantize
from projectable_edge_runtime.graphs.runners import ort_session
from tiny_models import TINY, sample_graph, tiny_export, tiny_variant, without_softmax


@pytest.fixture(scope="module")
def ex():
    return tiny_export()


def _consumers(model):
    prod = {o: n for n in model.graph.node for o in n.output}
    return prod, {i.name: i for i in model.graph.initializer}


def test_fp16_within_half_percent_and_keeps_io_types(ex):
    path, rep = tiny_variant("scoring", "fp16")
    b = rep["bits_per_dim"]
    assert abs(b["rel_vs_fp32"]) < 0.005 and abs(b["rel_vs_pytorch"]) < 0.005 and b["within_budget"]
    model = onnx.load(str(path))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # keep_io_types
    ch = rep["fp16_choice"]  # the fp32-kept ops were measured, with the numbers in the report
    assert set(ch["candidates"]) >= {"LayerNormalization", "Softmax"}
    assert {"bits_fp32", "bits_all_fp16", "bits_sensitive_ops_fp32"} <= set(ch)
    kept = set(ch["kept_fp32_op_types"])
    assert kept in (set(), set(ch["candidates"]))
    if ch["bits_sensitive_ops_fp32"] is None:  # not measured: all-fp16 was within the threshold, so nothing kept
        assert abs(ch["bits_all_fp16"] - ch["bits_fp32"]) <= ch["threshold_rel"] * ch["bits_fp32"] and not kept
    assert len(rep["float_layers"]["fp32_nodes"]) == sum(n.op_type in kept for n in model.graph.node)
    assert rep["parity"]["ok"] and rep["parity"]["outputs"]["logits"]["max_abs"] > 0  # really changed numerics


def test_fp16_keep_choice_is_measured_when_all_fp16_is_off(tmp_path, ex):
    s = QuantizeSettings(precision="fp16", fp16_matter_rel=0.0)  # any loss counts: the kept ops are measured
    _, rep = quantize(ex.scoring, s, tmp_path / "f16.onnx", heldout=ex.heldout[:16])
    ch = rep["fp16_choice"]
    assert ch["bits_all_fp16"] != ch["bits_fp32"] and isinstance(ch["bits_sensitive_ops_fp32"], float)
    recovers = abs(ch["bits_all_fp16"] - ch["bits_fp32"]) > abs(ch["bits_sensitive_ops_fp32"] - ch["bits_fp32"])
    assert ch["sensitive_ops_matter"] == recovers
    assert set(ch["kept_fp32_op_types"]) == (set(ch["candidates"]) if recovers else set())


def test_fp16_keep_list_is_honoured(tmp_path, ex):
    s = QuantizeSettings(precision="fp16", fp16_keep_fp32=("LayerNormalization", "Softmax"))
    path, rep = quantize(ex.scoring, s, tmp_path / "f16.onnx", heldout=ex.heldout[:16])
    names = rep["float_layers"]["fp32_nodes"]
    assert len(names) == 2 * TINY.n_layer + 1 + TINY.n_layer  # 2 LN per block + final LN, 1 softmax per block
    assert any("attn_softmax" in n for n in names)
    assert rep["validation"]["source"] == "heldout"
    # one op type given as a string is that op type (it was read as its letters: nothing was kept in fp32)
    _, rep = quantize(ex.scoring, {"precision": "fp16", "fp16_keep_fp32": "Softmax"}, tmp_path / "one.onnx")
    assert rep["fp16_choice"]["kept_fp32_op_types"] == ["Softmax"] and len(rep["float_layers"]["fp32_nodes"]) == 2


def test_int8_static_is_qdq_around_the_matmuls(ex):
    path, rep = tiny_variant("scoring", "int8-static")
    model = onnx.load(str(path))
    prod, inits = _consumers(model)
    weight_mms = [n for n in model.graph.node if n.op_type == "MatMul" and "attn_" not in n.name]
    assert len(weight_mms) == 4 * TINY.n_layer + 1  # q|k|v fused, out, 2 MLP per block; the head
    consumers = {i for n in model.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    assert not consumers & {n.output[0] for n in weight_mms}  # products stay float (no re-quantization)
    for n in weight_mms:
        dqs = [prod[i] for i in n.input]
        assert all(d.op_type == "DequantizeLinear" for d in dqs), n.name
        act, w = dqs
        assert prod[act.input[0]].op_type == "QuantizeLinear"  # activation: Q -> DQ pair
        q_w = numpy_helper.to_array(inits[w.input[0]])  # weight: int8 initializer, per-channel, symmetric
        assert q_w.dtype == np.int8
        assert numpy_helper.to_array(inits[w.input[1]]).shape == (q_w.shape[1],)
        assert not numpy_helper.to_array(inits[w.input[2]]).any()
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            assert numpy_helper.to_array(inits[n.input[2]]).dtype == np.int8  # symmetric int8 activations
    fl = rep["float_layers"]
    assert sorted(fl["float_matmuls"]) == sorted(f"h{i}_attn_{k}/MatMul" for i in range(TINY.n_layer)
                                                  for k in ("scores", "values"))
    assert fl["other_float_ops"]["LayerNormalization"] == 2 * TINY.n_layer + 1


def test_int8_static_accuracy_and_calibration_fingerprint(ex):
    _, rep = tiny_variant("scoring", "int8-static")
    b = rep["bits_per_dim"]
    assert abs(b["rel_vs_fp32"]) < 0.03 and b["within_budget"] and b["variant"] != b["fp32"]
    c = rep["calibration"]
    assert c["sha256"] == tokens_sha256(ex.train) and c["used"] == len(ex.train)
    assert c["used_sha256"] == tokens_sha256(ex.train[: c["used"]])
    json.dumps(rep)  # plain data


def test_int8_dynamic_reported_next_to_static(ex):
    path, rep = tiny_variant("scoring", "int8-dynamic")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops
    assert rep["calibration"]["sha256"] == tokens_sha256(ex.train)  # recorded even if unused
    assert abs(rep["bits_per_dim"]["rel_vs_fp32"]) < 0.03
    assert len(rep["float_layers"]["int8_matmuls"]) == 4 * TINY.n_layer + 1  # q|k|v fused, out, 2 MLP; head


@pytest.mark.parametrize("precision", ["fp16", "int8-static"])
def test_decode_variants_validate_and_sample_from_bos(ex, precision):
    path, rep = tiny_variant("decode", precision)
    assert rep["graph"] == "decode" and rep["bits_per_dim"]["within_budget"]
    if precision == "int8-static":  # calibrated on every step of teacher-forced decoding
        assert rep["calibration"]["used"] == QuantizeSettings("int8-static").decode_calibration_sequences
    sess = ort_session(path)
    assert [i.type for i in sess.get_inputs()] == ["tensor(int64)", "tensor(float)", "tensor(float)"]
    out = sample_graph(path, 3, seed=0, temperature=0)  # starts from past length 0
    assert out.shape == (3, TINY.block_size) and out.max() < TINY.vocab_size


@pytest.mark.parametrize("graph", ["scoring", "decode"])
def test_int8_static_passes_the_tensorrt_check(ex, graph):
    """TensorRT builds its int8 engines from this graph: QDQ it can read (no int32 biases of Gemms)."""
    from projectable_edge.exporters.trt_check import check_tensorrt_compat

    report = check_tensorrt_compat(tiny_variant(graph, "int8-static")[0])
    assert report["ok"] and report["quantized"], report["problems"]


def test_uint8_activations_option(ex):
    path, _ = tiny_variant("scoring", "int8-static", "uint8")
    zps = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name.endswith("zero_point")]
    assert any(z.dtype == np.uint8 for z in zps)


def test_bad_quantize_inputs_write_nothing(tmp_path, ex):
    out = tmp_path / "q.onnx"
    with pytest.raises(ProjectableEdgeError, match="non-empty"):
        quantize(ex.scoring, "int8-static", out, calibration=np.zeros((0, 64), np.int64))
    with pytest.raises(ProjectableEdgeError, match="needs calibration"):
        quantize(ex.scoring, "int8-static", out)
    with pytest.raises(ProjectableEdgeError, match="unknown precision"):
        quantize(ex.scoring, "int4", out)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"definitely not a protobuf \xff\x00")
    with pytest.raises(ProjectableEdgeError, match="ONNX"):
        quantize(bad, "fp16", out)
    q_path, _ = tiny_variant("scoring", "int8-dynamic")
    with pytest.raises(ProjectableEdgeError, match="already quantized"):
        quantize(q_path, "fp16", out)
    with pytest.raises(ProjectableEdgeError, match="exclude_nodes"):
        quantize(ex.scoring, QuantizeSettings("int8-dynamic", exclude_nodes=("nope",)), out)
    # a variant over its accuracy budget is refused and nothing is written
    with pytest.raises(ProjectableEdgeError, match="budget"):
        quantize(ex.scoring, QuantizeSettings("int8-dynamic", budget_rel=-1.0), out, heldout=ex.heldout[:8])
    # options from Python: a wrong type or count is one clear error, not ORT's "No data is collected" or a
    # silently shorter set (calibration_sequences=-1 took all but the last sequence)
    for settings, needle in ((None, "must be a precision name, a dict or a QuantizeSettings, got None"),
                             ({"precision": "fp16", "budget": 0.1}, "unexpected keyword argument 'budget'"),
                             ({"precision": "int8-static", "calibration_sequences": 0}, "'calibration_sequences' must"),
                             ({"precision": "fp16", "validation_sequences": -3}, "'validation_sequences' must"),
                             ({"precision": "int8-dynamic", "exclude_nodes": [1]}, "'exclude_nodes' must be a list")):
        with pytest.raises(ProjectableEdgeError, match=needle):
            quantize(ex.scoring, settings, out, calibration=ex.heldout, heldout=ex.heldout[:8])
    # a graph that gives NaN (an op removed) is refused as broken, not converted ('scale issue' from int8-static's
    # calibrator, or fp16 'over its budget' at nan bits/dim)
    nan = without_softmax(ex.scoring, tmp_path / "nan.onnx")
    for precision in ("fp16", "int8-static"):
        with pytest.raises(ProjectableEdgeError, match="nan.onnx gives bits/dim nan on the heldout tokens: the graph "
                                                       "is broken; export the model again"):
            quantize(nan, precision, out, calibration=ex.heldout, heldout=ex.heldout[:8])
    nan.unlink()
    assert list(tmp_path.iterdir()) == [bad]
    out.write_bytes(b"existing")
    with pytest.raises(ProjectableEdgeError, match="already exists"):
        quantize(ex.scoring, "fp16", out)
    assert out.read_bytes() == b"existing"
    # overwrite replaces an earlier quantized graph only: not the graph being quantized (nor any other file)
    src = tmp_path / "scoring.onnx"
    shutil.copy(ex.scoring, src)
    for target in (src, bad):
        before = target.read_bytes()
        with pytest.raises(ProjectableEdgeError, match="not a graph written by `quantize`"):
            quantize(src, "fp16", target, overwrite=True)
        assert target.read_bytes() == before
    out.unlink()
    quantize(src, "fp16", out)
    quantize(src, "fp16", out, overwrite=True)  # an earlier output is replaced


def test_cli_quantize(tmp_path, ex):
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    np.save(tmp_path / "calib.npy", ex.train[:32])
    np.save(tmp_path / "empty.npy", np.zeros((0, 64), np.int64))
    runner = CliRunner()
    r = runner.invoke(app, ["quantize", str(ex.scoring), "--precision", "int8-static", "--calibration",
                            str(tmp_path / "calib.npy"), "--out", str(tmp_path / "s8.onnx"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["calibration"]["sha256"] == tokens_sha256(ex.train[:32])
    assert rep["validation"]["source"].startswith("calibration")
    bad = runner.invoke(app, ["quantize", str(ex.scoring), "--precision", "int8-static", "--calibration",
                              str(tmp_path / "empty.npy"), "--out", str(tmp_path / "e.onnx")])
    assert bad.exit_code == 2 and "non-empty" in bad.output and not (tmp_path / "e.onnx").exists()
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object))
    pick = runner.invoke(app, ["quantize", str(ex.scoring), "--precision", "int8-static", "--calibration",
                               str(tmp_path / "obj.npy"), "--out", str(tmp_path / "p.onnx")])
    assert pick.exit_code == 2 and "not a readable .npy" in " ".join(pick.output.split())


def test_a_new_precision_is_one_registry_entry_plus_one_converter(tmp_path, ex, monkeypatch):
    """What the README's "Adding a precision" promises: nothing else needs to change."""
    from projectable_edge_runtime.devices import variants
    from projectable_edge.exporters import converters

    entry = variants.Variant(name="fp32-copy", family="fp32", precision=None, budget_rel=1e-6,
                             converter="fp32-copy", tensorrt_flags=(), tensorrt_buildable=True,
                             description="test: the graph unchanged", tolerances=dict(variants.FP32.tolerances))
    monkeypatch.setitem(variants.VARIANTS, entry.name, entry)
    monkeypatch.setitem(converters.CONVERTERS, "fp32-copy", lambda job: (job.proto, {}))
    assert "fp32-copy" in variants.converted()
    path, rep = quantize(ex.scoring, "fp32-copy", tmp_path / "copy.onnx", heldout=ex.heldout[:8], model=ex.model)
    b = rep["bits_per_dim"]
    assert b["rel_vs_fp32"] == 0 and b["within_budget"] and b["budget_rel"] == 1e-6
    assert rep["parity"]["ok"] and rep["parity"]["outputs"]["logits"]["max_abs"] < 1e-4


def test_fp16_of_a_one_layer_decode_graph(tmp_path):
    """With one layer, present_keys/present_values are graph outputs that the attention also reads: the fp16
    graph must still read them in fp16 (keep_io_types casts the output names back to fp32)."""
    from dataclasses import replace

    from projectable_edge.exporters.onnx_export import export_onnx
    from tiny_models import synthetic_tokens, tiny_trained_model

    model = tiny_trained_model(replace(TINY, n_layer=1), steps=20)
    heldout = synthetic_tokens(16, seed=99)
    art, _ = export_onnx(model, None, tmp_path / "export", heldout=heldout, log=lambda s: None)
    out, rep = quantize(art.decode, QuantizeSettings(precision="fp16"), tmp_path / "decode16.onnx",
                        heldout=heldout, model=model)
    assert rep["bits_per_dim"]["within_budget"]
    assert [i.type for i in ort_session(out).get_inputs()] == ["tensor(int64)", "tensor(float)", "tensor(float)"]
    assert sample_graph(out, 2, seed=0, temperature=0).shape == (2, TINY.block_size)
