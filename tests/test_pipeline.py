"""`generate` end to end on a tiny run, its step cache, and the bundle commands of the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import projectable_edge_runtime as runtime
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.cli import app
from projectable_edge.pipeline import GenerateSettings, generate
from projectable_edge_runtime.manifest import sha256_file

cli = CliRunner()
pytestmark = pytest.mark.slow  # end to end: a trained run, exports, quantization, subprocess benchmarks


@pytest.fixture(scope="module")
def jetson_bundle(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "3__jetson"
    path, _ = generate(GenerateSettings(task="3", target="jetson", source=str(tiny_run), out=str(out),
                                        bench_runs=10, samples=4), log=lambda m: None)
    return path


def test_jetson_bundle_is_complete_and_honest(jetson_bundle):
    m = json.loads((jetson_bundle / "manifest.json").read_text())
    assert m["task"] == {"name": "3", "index": 3}
    assert m["target"]["name"] == "jetson-orin-nano"
    on_disk = {p.relative_to(jetson_bundle).as_posix() for p in jetson_bundle.rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert set(m["files"]) == on_disk  # every file listed...
    for rel, info in m["files"].items():  # ...with its real hash and size
        assert info["sha256"] == sha256_file(jetson_bundle / rel)
        assert info["bytes"] == (jetson_bundle / rel).stat().st_size
    # every precision the profile asks for was built and measured against fp32 and PyTorch
    assert set(m["graphs"]) == {"fp32", "fp16", "int8-static"}
    acc = m["accuracy"]["variants"]
    assert abs(acc["fp16"]["bits"] - acc["fp32"]["bits"]) / acc["fp32"]["bits"] < 0.005
    assert abs(acc["int8-static"]["bits"] - acc["fp32"]["bits"]) / acc["fp32"]["bits"] < 0.03
    assert abs(acc["fp32"]["bits"] - m["accuracy"]["reference_bits"]) < 1e-4
    assert m["selected"] == "int8-static"  # the profile's first choice, within budget
    # TensorRT: deferred here, with the exact command, and said so
    assert m["engine"]["status"] == "deferred"
    script = (jetson_bundle / "engine" / "build_engine.sh").read_text()
    assert m["engine"]["typing"] == "strong" and "--int8" not in script  # QDQ graph, TensorRT 10.3
    for flag in ("--stronglyTyped", "--minShapes=tokens:1x1", "--maxShapes=tokens:32x64",
                 "--memPoolSize=workspace:1024M"):
        assert flag in script, flag
    assert "--useDLACore" not in script  # the Orin Nano has no DLA
    assert any("TensorRT" in s for s in m["exercised"]["not_done"])
    # host latency of every variant, percentiles in order
    for v in m["graphs"]:
        s = m["latency_host"][v]["score_batch1"]
        assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
    assert m["provenance"]["source_weights_sha256"]
    report = (jetson_bundle / "report.md").read_text()
    assert "deferred" in report and "int8-static" in report


def test_runtime_validates_and_samples_the_bundle(jetson_bundle):
    with runtime.load(jetson_bundle) as model:
        assert model.variant == "int8-static"
        assert runtime.validate(model)["passed"]
        tokens = model.sample(3, seed=1)
        assert tokens.shape == (3, 64) and tokens.min() >= 0 and tokens.max() < 17
        bits = model.score(tokens)
        assert np.all(bits > 0) and np.all(bits < math.log2(17) + 1)


def test_x86_bundle_uses_onnxruntime_and_ort_format(tiny_run, tmp_path):
    path, m = generate(GenerateSettings(task="7", target="x86-64-cpu", source=str(tiny_run),
                                        out=str(tmp_path / "b"), bench_runs=5, samples=2), log=lambda _: None)
    assert m["engine"]["status"] == "not-applicable"
    assert m["selected"] == "fp32"
    assert any(f.endswith(".ort") for f in m["files"])
    assert not (path / "build_engine.sh").exists()


def test_bad_inputs_write_nothing(tiny_run, tmp_path):
    cases = [({"target": "no-such-device"}, "no-such-device"),
             ({"task": "12"}, "12"),
             ({"source": str(tmp_path / "missing-run")}, "missing-run"),
             ({"precision": "int3"}, "int3")]
    for override, needle in cases:
        s = dict(task="3", target="jetson", source=str(tiny_run), out=str(tmp_path / "b"))
        s.update(override)
        with pytest.raises(ProjectableEdgeError, match=needle):
            generate(GenerateSettings(**s), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_generate_leaves_no_bundle(tiny_run, tmp_path, tmp_path_factory, monkeypatch):
    import projectable_edge.exporters.quantize as q

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "quantize", interrupted)
    cache = tmp_path_factory.mktemp("cache")
    with pytest.raises(KeyboardInterrupt):
        generate(GenerateSettings(task="3", target="jetson", source=str(tiny_run), out=str(tmp_path / "b"),
                                  cache_dir=str(cache)), log=lambda _: None)
    assert list(tmp_path.iterdir()) == []  # no bundle, no staging folder
    # the export finished before the interruption and is cached whole; nothing half-written is left
    assert [p.name for p in cache.iterdir()] == ["export"]
    (entry,) = (cache / "export").iterdir()
    assert not entry.name.startswith(".") and (entry / "result.json").is_file()


def test_second_target_reuses_export_and_quantization(jetson_bundle, tiny_run):
    """Same task, another target: the export and int8-static graphs come from the step cache."""
    out = jetson_bundle.parent / "3__x86-64-cpu"
    logs = []
    path, m = generate(GenerateSettings(task="3", target="x86-64-cpu", source=str(tiny_run), out=str(out),
                                        bench_runs=5, samples=2), log=logs.append)
    cache = m["provenance"]["cache"]
    assert cache["hits"] == ["export", "quantize-int8-static"] and cache["misses"] == []
    assert cache["saved_seconds"] > 1 and any("step cache: reused" in line for line in logs)
    first = json.loads((jetson_bundle / "manifest.json").read_text())
    for variant in ("fp32", "int8-static"):  # the very same graphs, and the same measured accuracy
        for rel in m["graphs"][variant].values():
            assert m["files"][rel]["sha256"] == first["files"][rel]["sha256"]
        assert m["accuracy"]["variants"][variant]["bits"] == first["accuracy"]["variants"][variant]["bits"]
    no_cache = first["provenance"]["cache"]
    assert no_cache["hits"] == [] and no_cache["misses"] == ["export", "quantize-int8-static", "quantize-fp16"]


def test_cli_bundle_commands(jetson_bundle, tmp_path):
    res = cli.invoke(app, ["benchmark", str(jetson_bundle), "--runs", "10", "--json"])
    rep = json.loads(res.stdout)
    for k in ("score_batch1", "score_batch16", "sample_full_image"):
        r = rep["results"][k]
        assert r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["throughput_per_s"] > 0
    # the verdict is the budgets' verdict, and the exit code says it (1 = over a budget, still a full report)
    budgets, p99 = rep["budgets"], rep["results"]["score_batch1"]["p99_ms"]
    assert [c["passed"] for c in rep["checks"]] == [p99 <= budgets["p99_latency_ms"],
                                                   rep["peak_rss_mb"] <= budgets["memory_mb"]]
    assert rep["verdict"] == ("pass" if all(c["passed"] for c in rep["checks"]) else "fail")
    assert res.exit_code == (0 if rep["verdict"] == "pass" else 1), res.output
    png = tmp_path / "grid.png"
    res = cli.invoke(app, ["sample", str(jetson_bundle), "-n", "6", "--out", str(png), "--scale", "2"])
    assert res.exit_code == 0, res.output
    from PIL import Image

    img = np.asarray(Image.open(png))
    assert img.shape[0] > 16 and img.shape[1] > 16 and img.std() > 0


def test_cli_errors_are_one_line_without_traceback(tmp_path, jetson_bundle):
    res = cli.invoke(app, ["generate", "--task", "3", "--target", "toaster", "--source", "runs/none"])
    assert res.exit_code == 2
    assert "toaster" in res.output and "Traceback" not in res.output
    # a tampered bundle: the error names the file
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(jetson_bundle, copy)
    target = copy / "fp32" / "scoring.onnx"
    data = bytearray(target.read_bytes())
    data[-10] ^= 0xFF
    target.write_bytes(bytes(data))
    res = cli.invoke(app, ["benchmark", str(copy), "--runs", "5"])
    assert res.exit_code == 2 and "fp32/scoring.onnx" in res.output
    res = cli.invoke(app, ["sample", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "nowhere" in res.output and "does not" in res.output


def test_cli_train_evaluate_project_tasks(tiny_run, tmp_path):
    res = cli.invoke(app, ["evaluate", str(tiny_run), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert set(rep["macro_bits_per_dim"]) == {"source", "projected", "universal", "scratch"}
    res = cli.invoke(app, ["tasks", str(tiny_run), "--json"])
    assert [t["name"] for t in json.loads(res.stdout)["tasks"]] == [str(i) for i in range(10)]
    res = cli.invoke(app, ["project", str(tiny_run), "--task", "5", "--out", str(tmp_path / "p5"), "--json"])
    # measured and reported; how fast it is lives in benchmarks/bench_projection.py, not in a timed test
    assert res.exit_code == 0 and json.loads(res.stdout)["projection_ms"] > 0
    assert (tmp_path / "p5.safetensors").stat().st_size > 1000
    res = cli.invoke(app, ["train", "--dataset", str(tmp_path / "nope"), "--preset", "tiny",
                           "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "nope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "r").exists()
    res = cli.invoke(app, ["train", "--preset", "tiny", "--steps", "4", "--out", str(tmp_path / "r2"),
                           "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["steps"] == 4
