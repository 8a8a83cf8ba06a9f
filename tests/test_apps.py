"""The example apps (examples/anomaly, examples/classify) on real bundles, torch-free.

Two tiny bundles: `bars` (a model trained on synthetic bar images) and the runtime tests' bundle
(`tiny-task`, a random peaked model). Numbers asserted here are measured by the apps themselves.
"""
from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import projectable_edge_runtime as runtime

ROOT = Path(__file__).resolve().parents[1]
APPS = {name: ROOT / "examples" / name / f"{name}.py" for name in ("anomaly", "classify")}


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"test_app_{name}", APPS[name])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


anomaly = _load("anomaly")
classify = _load("classify")


@pytest.fixture(scope="module")
def bars_bundle(rt_build, tmp_path_factory) -> Path:
    """A bundle of a tiny model trained on bar images (task 'bars'); its goldens are held-out bars."""
    import torch

    from projectable_edge.model import bits_per_dim
    from tiny_models import tiny_export

    ex = tiny_export()
    x = torch.from_numpy(ex.heldout)
    with torch.no_grad():
        ref = bits_per_dim(ex.model(x), x).double().numpy()
    graphs = {"score": ex.scoring, "decode": ex.decode, "cfg": ex.model.cfg.to_dict(), "goldens": ex.heldout,
              "ref_bits": ref}
    return rt_build(tmp_path_factory.mktemp("apps") / "bars__x86-64-cpu", graphs, variants=("fp32",),
                    task={"name": "bars", "index": 0})


def bars_images(n: int, seed: int) -> np.ndarray:
    from tiny_models import synthetic_tokens

    return (synthetic_tokens(n, seed=seed) * 255 // 16).astype(np.uint8).reshape(n, 8, 8)


def noise_images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 8)).astype(np.uint8)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- statistics


def test_auroc_is_the_pairwise_probability_with_ties_half():
    rng = np.random.default_rng(0)
    normal, anomalous = rng.integers(0, 20, 150).astype(float), rng.integers(3, 25, 90).astype(float)
    pairs = (anomalous[None, :] > normal[:, None]).mean() + 0.5 * (anomalous[None, :] == normal[:, None]).mean()
    assert anomaly.auroc(normal, anomalous) == pytest.approx(pairs, abs=1e-12)
    assert anomaly.auroc([0, 1], [2, 3]) == 1.0 and anomaly.auroc([2, 3], [0, 1]) == 0.0


@pytest.mark.parametrize("rate", [0.0, 0.01, 0.05, 0.2, 0.5])
def test_threshold_is_the_tightest_with_at_most_the_rate_above(rate):
    scores = np.random.default_rng(1).normal(2, 0.3, 101)
    th = anomaly.threshold_at(scores, rate)
    assert (scores > th).mean() <= rate + 1e-12
    below = scores[scores < th]
    if below.size:  # one step lower would flag more than the rate allows
        assert (scores > below.max()).mean() > rate


def test_rates_count_false_alarms_and_misses():
    r = anomaly.rates([1.0, 2.0, 3.0, 4.0], [2.5, 5.0], threshold=3.0)
    assert r == {"false_alarm_rate": 0.25, "miss_rate": 0.5}


# ----------------------------------------------------------------------------- anomaly app


def test_anomaly_calibrate_then_score_a_folder(bars_bundle, tmp_path, capsys):
    config = tmp_path / "anomaly.json"
    before = sorted((p.relative_to(bars_bundle), p.stat().st_mtime_ns) for p in bars_bundle.rglob("*"))
    assert anomaly.main(["calibrate", str(bars_bundle), "--config", str(config), "--false-alarm-rate", "0.1"]) == 0
    assert sorted((p.relative_to(bars_bundle), p.stat().st_mtime_ns) for p in bars_bundle.rglob("*")) == before
    cfg = json.loads(config.read_text())
    with runtime.load(bars_bundle) as m, np.load(bars_bundle / "goldens.npz") as z:
        gold = m.score(z["tokens"])
        in_task, noise = m.score(bars_images(20, seed=7)), m.score(noise_images(20, seed=3))
    assert cfg["threshold"] == pytest.approx(anomaly.threshold_at(gold, 0.1), abs=1e-12)
    assert cfg["calibration"]["n_images"] == len(gold) and cfg["task"] == "bars"

    folder = tmp_path / "inbox"
    folder.mkdir()
    np.save(folder / "a_bars.npy", bars_images(20, seed=7))
    np.save(folder / "b_noise.npy", noise_images(20, seed=3))
    np.save(folder / "c_one.npy", noise_images(1, seed=3)[0])  # a single [H, W] image
    capsys.readouterr()
    assert anomaly.main(["score", "--config", str(config), str(folder)]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert len(lines) == 41 and lines[-1]["image"].endswith("c_one.npy")
    scores = np.array([line["score"] for line in lines])
    np.testing.assert_allclose(scores[:40], np.r_[in_task, noise], atol=1e-5)
    assert all(line["verdict"] == ("anomaly" if line["score"] > cfg["threshold"] else "normal") for line in lines)
    assert all(line["latency_ms"] > 0 for line in lines)
    # the detector separates bars from noise (measured): AUROC and every noise image flagged
    assert anomaly.auroc(scores[:20], scores[20:40]) > 0.99
    assert all(line["verdict"] == "anomaly" for line in lines[20:])


def test_anomaly_with_references_subtracts_the_best_other_task(bars_bundle, rt_bundle, tmp_path, capsys):
    config = tmp_path / "rel.json"
    argv = ["calibrate", str(bars_bundle), "--config", str(config), "--reference", str(rt_bundle), str(bars_bundle)]
    assert anomaly.main(argv) == 0  # the detector's own bundle among the references is left out
    cfg = json.loads(config.read_text())
    assert cfg["score"] == "bits_per_dim_minus_best_reference"
    assert [r["task"] for r in cfg["references"]] == ["tiny-task"]
    x = np.concatenate([bars_images(5, seed=31), noise_images(3, seed=32)])
    np.save(tmp_path / "x.npy", x)
    capsys.readouterr()
    assert anomaly.main(["score", "--config", str(config), str(tmp_path / "x.npy")]) == 0
    got = [line["score"] for line in json_lines(capsys.readouterr().out)]
    with runtime.load(bars_bundle) as a, runtime.load(rt_bundle) as b, np.load(bars_bundle / "goldens.npz") as z:
        np.testing.assert_allclose(got, a.score(x) - b.score(x), atol=1e-5)
        gold = z["tokens"]
        assert cfg["threshold"] == pytest.approx(anomaly.threshold_at(a.score(gold) - b.score(gold), 0.05), abs=1e-9)
    assert anomaly.main(["calibrate", str(bars_bundle), "--config", str(tmp_path / "own.json"),
                         "--reference", str(bars_bundle)]) == 2
    assert "no other task's bundle" in capsys.readouterr().err


def test_anomaly_reads_npy_from_stdin_as_a_script(bars_bundle, tmp_path):
    config = tmp_path / "c.json"
    run = lambda *a, **kw: subprocess.run([sys.executable, str(APPS["anomaly"]), *a], capture_output=True,  # noqa: E731
                                          cwd=tmp_path, **kw)
    assert run("calibrate", str(bars_bundle), "--config", "c.json").returncode == 0
    import io

    buf = io.BytesIO()
    np.save(buf, np.concatenate([bars_images(3, seed=11), noise_images(2, seed=12)]))
    p = run("score", "--config", str(config), "-", input=buf.getvalue())
    assert p.returncode == 0, p.stderr
    lines = json_lines(p.stdout.decode())
    assert [line["image"] for line in lines] == [f"stdin[{i}]" for i in range(5)]
    assert [line["verdict"] for line in lines[3:]] == ["anomaly", "anomaly"]
    p = run("score", "--config", str(config), "--fail-on-anomaly", "-", input=buf.getvalue())
    assert p.returncode == 1


@pytest.mark.parametrize("case", ["no config", "other bundle", "config exists", "bad npy", "bad rate", "missing input"])
def test_anomaly_user_errors_are_one_line_exit_2(bars_bundle, rt_bundle, tmp_path, capsys, case):
    config = tmp_path / "c.json"
    assert anomaly.main(["calibrate", str(bars_bundle), "--config", str(config)]) == 0
    (tmp_path / "bad.npy").write_bytes(b"not a numpy file")
    argv, word = {
        "no config": (["score", "--config", str(tmp_path / "none.json"), "x"], "calibrate"),
        "other bundle": (None, "recalibrate"),
        "config exists": (["calibrate", str(bars_bundle), "--config", str(config)], "already exists"),
        "bad npy": (["score", "--config", str(config), str(tmp_path / "bad.npy")], ".npy"),
        "bad rate": (["calibrate", str(bars_bundle), "--config", str(tmp_path / "d.json"),
                      "--false-alarm-rate", "1.5"], "false-alarm rate"),
        "missing input": (["score", "--config", str(config), str(tmp_path / "nowhere")], "not found"),
    }[case]
    if argv is None:  # a config whose digest is another bundle's
        cfg = json.loads(config.read_text())
        cfg["bundle"] = str(rt_bundle)
        config.write_text(json.dumps(cfg))
        argv = ["score", "--config", str(config), str(tmp_path / "bad.npy")]
    capsys.readouterr()
    assert anomaly.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err and "Traceback" not in err


# ----------------------------------------------------------------------------- classify app


def test_classify_picks_the_task_whose_model_explains_the_image(bars_bundle, rt_bundle, tmp_path, capsys):
    folder = tmp_path / "bundles"
    folder.mkdir()
    for b in (bars_bundle, rt_bundle):
        (folder / b.name).symlink_to(b, target_is_directory=True)
    with runtime.load(rt_bundle) as m, np.load(rt_bundle / "goldens.npz") as z:
        peaked_goldens = z["tokens"]
    images = tmp_path / "images"
    images.mkdir()
    np.save(images / "bars.npy", bars_images(10, seed=21))
    np.save(images / "peaked.npy", peaked_goldens[:4])
    assert classify.main([str(folder), "--images", str(images)]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert len(lines) == 14
    assert {line["task"] for line in lines[:10]} == {"bars"}  # measured: the bar model explains bars best
    for line in lines:
        assert line["task"] == min(line["bits_per_dim"], key=line["bits_per_dim"].get)
        assert set(line["bits_per_dim"]) == {"bars", "tiny-task"} and line["latency_ms"] > 0
    with runtime.load(rt_bundle) as m:
        expected = m.score(peaked_goldens[:4])
    np.testing.assert_allclose([line["bits_per_dim"]["tiny-task"] for line in lines[10:]], expected, atol=1e-5)


def test_classifier_api_bits_matrix(bars_bundle, rt_bundle):
    x = bars_images(6, seed=5)
    with classify.Classifier([bars_bundle, rt_bundle]) as clf, runtime.load(bars_bundle) as a, \
            runtime.load(rt_bundle) as b:
        bits = clf.bits(x)
        assert bits.shape == (6, 2) and clf.tasks == ["bars", "tiny-task"]
        np.testing.assert_allclose(bits, np.stack([a.score(x), b.score(x)], axis=1), rtol=0, atol=1e-9)
        assert clf.predict(x) == [clf.tasks[i] for i in bits.argmin(axis=1)]


@pytest.mark.parametrize("case", ["same task twice", "one bundle", "not a bundle"])
def test_classify_user_errors_are_one_line_exit_2(rt_bundle, tmp_path, capsys, case):
    argv, word = {
        "same task twice": ([str(rt_bundle), str(rt_bundle)], "same task"),
        "one bundle": ([str(rt_bundle)], "at least two"),
        "not a bundle": ([str(tmp_path)], "no manifest.json"),
    }[case]
    assert classify.main([*argv, "--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err and "Traceback" not in err


# ----------------------------------------------------------------------------- both apps


@pytest.mark.parametrize("name", sorted(APPS))
def test_apps_use_only_numpy_the_stdlib_and_the_runtimes_public_api(name):
    tree = ast.parse(APPS[name].read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods, names = [a.name for a in node.names], []
        elif isinstance(node, ast.ImportFrom):
            mods, names = [node.module or ""], [a.name for a in node.names]
        else:
            continue
        for mod in mods:
            top = mod.split(".")[0]
            assert top in sys.stdlib_module_names or top in ("numpy", "projectable_edge_runtime", "__future__"), mod
            assert not any(part.startswith("_") for part in mod.split(".")[1:]), mod
        assert not any(n.startswith("_") for n in names if n != "annotations"), names


def test_app_metrics_helpers_measure_what_they_say():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import app_metrics
    finally:
        sys.path.pop(0)
    bits = np.array([[1.0, 3.0], [2.0, 1.5], [0.5, 0.9], [4.0, 1.0]])
    labels = np.array([0, 0, 1, 1])
    acc = app_metrics.accuracy(bits, labels)
    assert acc["accuracy"] == 0.5 and acc["per_task"] == [0.5, 0.5]
    an = app_metrics.anomaly_metrics(bits, labels, [1.5, 1.0])
    assert an["per_task"][0]["auroc"] == anomaly.auroc([1.0, 2.0], [0.5, 4.0])
    assert an["per_task"][1]["false_alarm_rate"] == 0.0
    assert an["per_task"][1]["miss_rate"] == 0.0 and an["macro"]["auroc"] == pytest.approx(
        np.mean([r["auroc"] for r in an["per_task"]]))


# ----------------------------------------------------------------------------- benchmarks


def _benchmark(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_bench_projection_times_source_and_projected_interleaved(monkeypatch):
    """The eager source / projected ratio comes from interleaved rounds, not one block of each."""
    import types

    import torch

    import projectable_edge.project as project

    bench, calls = _benchmark("bench_projection"), []
    monkeypatch.setattr(bench, "forward", lambda *a: calls.append("source"))
    monkeypatch.setattr(project, "specialise", lambda *a: lambda x: calls.append("projected"))
    model = types.SimpleNamespace(specialise=lambda role, t: (None, None, torch.zeros(4)))
    out = bench.source_vs_small(model, 0, torch.zeros(3, 4, dtype=torch.long), repeats=6)
    assert calls.count("source") == calls.count("projected") and out["batch"] == 3
    assert sum(a != b for a, b in zip(calls, calls[1:])) >= 6  # one block of each switches once


@pytest.mark.parametrize("case", ["run", "bundle-json", "model-size", "not-held-out"])
def test_benchmark_user_errors_are_one_line_exit_2(case, tiny_run):
    args = {"run": ["bench_projection.py", "/no/such/run"],
            "bundle-json": ["bench_runtime_overhead.py", "--bundle", "/no/such/bundle", "--json"],
            "model-size": ["bench_decode.py", "--models", "32x4"],
            "not-held-out": ["bench_adapt.py", str(tiny_run)]}[case]
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
    assert {"run": "not found", "bundle-json": "does not exist", "model-size": "WIDTHxLAYERS@SIDE",
            "not-held-out": "--hold-out-task"}[case] in p.stderr
    assert (json.loads(p.stdout)["exit_code"] == 2) if case == "bundle-json" else p.stdout == ""


@pytest.mark.parametrize("args", [["init_spread.py", "--draws", "1"], ["bench_train_speed.py", "--rounds", "0"],
                                  ["bench_generate.py", "RUN", "--runs", "1", "--baseline", "/no/such/cli"],
                                  ["method_table.py", "--root", "ROOT", "--jobs", "0"],
                                  ["bench_serve.py", "BUNDLE", "--ab-requests", "-1"],
                                  ["app_metrics.py", "--tables-from", "/no/such.json"],
                                  ["bench_adapt.py", "--rows", "/no/such.json"],
                                  ["bench_export.py", "--threads", "0"]])
def test_benchmark_bad_options_are_usage_errors_not_nan_tables(args):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]], capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[-1].startswith(f"{args[0]}: error: ")


def test_bench_generate_ratio_is_the_median_of_the_per_round_ratios(monkeypatch, capsys):
    bench = _benchmark("bench_generate")
    this, base = np.array([1.0, 2.0, 3.0, 4.0]), np.ones(4)  # per-round this / baseline: median 2.5
    monkeypatch.setattr(bench, "interleaved", lambda fns, rounds, reps: {k: this if k.startswith("this") else base
                                                                          for k in fns})
    monkeypatch.setattr(sys, "argv", ["bench_generate.py", "RUN", "--runs", "4", "--baseline", sys.executable])
    bench.main()
    assert "cold: this / baseline, best 1.00x, median of per-round ratios 2.50x" in capsys.readouterr().out


def test_bench_serve_alternates_http_and_in_process_phases(monkeypatch, rt_bundle):
    """The HTTP overhead (HTTP p50 - in-process p50) compares slices run alternately, not one block after the other."""
    import time

    bench, calls = _benchmark("bench_serve"), []

    def client(mode):
        def run(*args):
            calls.append(mode)
            time.sleep(max(0.0, args[-2] - time.perf_counter()))
            return [1.0 if mode == "http" else 0.25], 0, None
        return run

    monkeypatch.setattr(bench, "start_server", lambda *a: (None, "127.0.0.1", 0))
    monkeypatch.setattr(bench, "stop_server", lambda p: {})
    monkeypatch.setattr(bench, "http_client", client("http"))
    monkeypatch.setattr(bench, "inproc_client", client("in-process"))
    out = bench.measure(rt_bundle, 1, 0.5, None, 1, 0)
    calls = calls[1:]  # after the HTTP warm-up
    assert sum(a != b for a, b in zip(calls, calls[1:])) >= 4 and out["overhead_p50_ms"] == {"1 clients": 0.75}
    assert [(p["mode"], p["errors"]) for p in out["phases"]] == [("http", 0), ("in-process", 0)] * 2


def test_bench_runtime_overhead_prints_the_load_it_ran_under(rt_bundle):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_runtime_overhead.py"), "--bundle", str(rt_bundle),
                        "--runs", "1", "--warmup", "0"], capture_output=True, text=True)
    assert p.returncode == 0 and "load average" in p.stdout.splitlines()[0], p.stderr


def test_bench_decode_checks_every_model_name_before_timing_any(monkeypatch):
    bench, timed = _benchmark("bench_decode"), []
    monkeypatch.setattr(bench, "bench_model", lambda name, *a: timed.append(name))
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--models", "32x4@8", "64x4", "--rounds", "1"])
    with pytest.raises(runtime.ProjectableEdgeError, match="WIDTHxLAYERS@SIDE"):
        bench.main()
    assert timed == []
