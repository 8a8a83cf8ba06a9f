"""Training, checkpoints, evaluation and the core CLI on the tiny preset."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.config import preset
from projectable_edge.data import DataConfig
from projectable_edge.evaluate import evaluate_run
from projectable_edge.project import load_projected, project_task, save_projected
from projectable_edge.train import load_run, partial_dir, train

UNIFORM_BITS = math.log2(17)


def test_training_lowers_every_loss(tiny_run):
    history = json.loads((tiny_run / "history.json").read_text())["history"]
    first, last = history[0], history[-1]
    for role in ("source", "projected", "universal", "scratch"):
        assert last["val_bits"][role] < first["val_bits"][role], role
        assert last["val_bits"][role] < UNIFORM_BITS - 0.5, role
    assert not partial_dir(tiny_run).exists()
    assert not (tiny_run / "state.safetensors").exists()


def test_run_round_trips_through_safetensors(tiny_run):
    meta, model, data = load_run(tiny_run)
    assert meta["task_names"] == [str(i) for i in range(10)]
    summary = json.loads((tiny_run / "summary.json").read_text())
    from projectable_edge.train import evaluate_roles

    val = evaluate_roles(model, *data.splits["val"], data.n_tasks, roles=("projected", "universal"))
    for role in ("projected", "universal"):  # the saved weights reproduce the best validation numbers
        assert float(val[role].mean()) == pytest.approx(summary["best_val_bits"][role], abs=1e-5)


def test_evaluate_times_projections_not_torchs_start_up(tiny_run, monkeypatch):
    """The first projection after scoring also pays lazy start-up (52 ms against 2 ms here): evaluate makes one
    call before timing. Here the call right after scoring is made slow on purpose."""
    import projectable_edge.evaluate as ev
    from projectable_edge.trainables import Trainables

    armed, real_bits, real_specialise = [], ev.role_image_bits, Trainables.specialise

    def bits(*a, **k):
        out = real_bits(*a, **k)
        armed.append(1)
        return out

    def specialise(self, *a, **k):
        if armed:
            armed.clear()
            time.sleep(2.0)
        return real_specialise(self, *a, **k)

    monkeypatch.setattr(ev, "role_image_bits", bits)
    monkeypatch.setattr(Trainables, "specialise", specialise)
    assert evaluate_run(tiny_run)["projection_ms"] < 100  # 2 s over 10 tasks would be 200 ms each


def test_evaluate_reports_every_role_with_sizes(tiny_run):
    report = evaluate_run(tiny_run)
    assert len(report["tasks"]) == 10
    for t in report["tasks"]:
        assert set(t["bits_per_dim"]) == {"source", "projected", "universal", "scratch"}
        assert all(0 < v < UNIFORM_BITS for v in t["bits_per_dim"].values())
    m = report["models"]
    assert abs(m["projected"]["params"] - m["universal"]["params"]) / m["universal"]["params"] < 0.05
    assert abs(m["projected"]["params"] - m["universal"]["params_total"]) / m["universal"]["params_total"] < 0.05
    assert m["source"]["params"] > 2 * m["projected"]["params"]
    assert m["source"]["flops_per_image"] > m["projected"]["flops_per_image"]
    macro = np.mean([t["bits_per_dim"]["projected"] for t in report["tasks"]])
    assert report["macro_bits_per_dim"]["projected"] == pytest.approx(macro)


def test_project_writes_a_model_that_scores_like_the_run(tiny_run, tmp_path):
    small, info = project_task(tiny_run, "3")
    st, js = save_projected(tmp_path / "p3", small, info)
    loaded, info2 = load_projected(st)
    assert info2["task"] == "3"
    tokens = torch.from_numpy(load_run(tiny_run)[2].split("test", 3))
    assert torch.allclose(loaded(tokens), small(tokens), atol=1e-6)
    # the projected model is the projected role of the run, task 3
    _, model, _ = load_run(tiny_run)
    tid = torch.full((len(tokens),), 3)
    assert torch.allclose(loaded(tokens), model.logits("projected", tokens, tid), atol=1e-5)


def test_resume_continues_an_interrupted_run(tmp_path):
    cfg = replace(preset("tiny"), steps=40, checkpoint_every=20, eval_every=20)
    out = tmp_path / "r"
    full = train(cfg, DataConfig(), tmp_path / "full", progress=False)
    # simulate an interruption after the step-20 checkpoint: train a 20-step prefix, keep its state
    work = partial_dir(out)
    import projectable_edge.train as tr

    calls = {"n": 0}
    real = tr.save_state

    def save_then_stop(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        raise KeyboardInterrupt

    tr.save_state = save_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, DataConfig(), out, progress=False)
    finally:
        tr.save_state = real
    assert (work / "state.safetensors").exists() and not out.exists()
    with pytest.raises(ProjectableEdgeError, match="--resume"):
        train(cfg, DataConfig(), out, progress=False)
    with pytest.raises(ProjectableEdgeError, match=r"started on other data: the dataset's images.*put the dataset "
                                                   r"back as it was.*or delete"):
        train(cfg, DataConfig(seed=1), out, resume=True, progress=False)
    with pytest.raises(ProjectableEdgeError, match="started with another config"):
        train(replace(cfg, lr=1e-3), DataConfig(), out, resume=True, progress=False)
    resumed = train(cfg, DataConfig(), out, resume=True, progress=False)
    for role, v in full["best_val_bits"].items():
        assert resumed["best_val_bits"][role] == pytest.approx(v, abs=1e-4), role


@pytest.mark.slow
def test_torchrun_ddp_on_cpu(tmp_path):
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "projectable_edge.cli", "train",
           "--preset", "tiny", "--steps", "20", "--out", str(out), "--no-progress", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"], summary["rank_weight_sums"]  # each rank saw other batches
    assert all(v < UNIFORM_BITS for v in summary["best_val_bits"].values())


def test_frozen_pretrained_source_is_projected_as_is(tiny_run, tmp_path):
    """--init-source + --freeze-source: the operator learns to project a fixed, pre-trained M."""
    cfg = replace(preset("tiny"), steps=10, freeze_source=True, eval_every=10)
    train(cfg, DataConfig(), tmp_path / "f", init_source=tiny_run, progress=False)
    _, model, _ = load_run(tmp_path / "f")
    _, pre, _ = load_run(tiny_run)
    assert torch.equal(model.source.weights()["h0.wq"], pre.source.weights()["h0.wq"])
    assert torch.equal(model.source_task, pre.source_task)
    assert not torch.equal(model.projector.coef.weight, pre.projector.coef.weight)
    with pytest.raises(ProjectableEdgeError, match="init-source"):
        train(replace(cfg, source=replace(cfg.source, d_mlp=128)), DataConfig(), tmp_path / "g",
              init_source=tiny_run, progress=False)
    with pytest.raises(ProjectableEdgeError, match="init-source .*other splits .*seen some of this run's validation"):
        train(cfg, DataConfig(seed=1), tmp_path / "g", init_source=tiny_run, progress=False)
    assert not (tmp_path / "g").exists()


def test_bad_inputs_leave_nothing_behind(tmp_path):
    with pytest.raises(ProjectableEdgeError, match="no-such-set"):
        train(preset("tiny"), DataConfig(dataset="no-such-set"), tmp_path / "a", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ProjectableEdgeError, match="empty"):
        train(preset("tiny"), DataConfig(dataset=str(empty)), tmp_path / "b", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    with pytest.raises(ProjectableEdgeError, match="preset"):
        preset("huge")


def test_unknown_task_and_bad_checkpoints(tiny_run, tmp_path):
    with pytest.raises(ProjectableEdgeError, match="unknown task|not a task|valid"):
        project_task(tiny_run, "eleven")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProjectableEdgeError, match="truncated"):
        load_run(broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ProjectableEdgeError, match="model.safetensors"):
        load_run(broken)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(broken / "model.safetensors"))  # foreign safetensors
    with pytest.raises(ProjectableEdgeError, match="not a projectable-edge"):
        load_run(broken)


@pytest.mark.skipif(not Path("/dev/full").is_char_device(), reason="needs /dev/full")
def test_a_full_disk_while_saving_a_checkpoint_is_a_user_error(tmp_path, monkeypatch):
    """train on a full disk ended with 'SafetensorError: Error while serializing: I/O error: No space left on device
    (os error 28)' and exit 1, as a bug does (safetensors writes the file itself); it is now the full-disk error of
    every writer, naming the file: exit 2, with the fix."""
    from contextlib import contextmanager

    import projectable_edge.checkpoint as ckpt
    from projectable_edge_runtime.commands.console import error_boundary

    real = ckpt.atomic_output

    @contextmanager
    def onto_a_full_disk(path, **kw):
        with real(path, **kw) as tmp:
            tmp.unlink()
            tmp.symlink_to("/dev/full")  # every write through it fails with ENOSPC
            yield tmp

    monkeypatch.setattr(ckpt, "atomic_output", onto_a_full_disk)
    said, dest = [], tmp_path / "m.safetensors"
    code = error_boundary(lambda: ckpt.save_tensors(dest, {"w": torch.zeros(4)}, "run"), say=said.append)
    assert code == 2 and f"'{dest}': No space left on device; free some space" in said[0], said
    assert list(tmp_path.iterdir()) == []


def test_the_same_tensors_give_the_same_file(tmp_path):
    """safetensors writes its metadata in hash order: two saves of the same weights differed in bytes and sha256."""
    import projectable_edge.checkpoint as ckpt

    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    files = set()
    for i in range(20):
        ckpt.save_tensors(tmp_path / f"{i}.safetensors", tensors, "run")
        files.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(files) == 1
    back = ckpt.load_tensors(tmp_path / "0.safetensors", "run")
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_ladder_and_fewer_layers_train_and_evaluate(tmp_path):
    """One run trains several small sizes (one with fewer layers), each beside its own universal."""
    from projectable_edge.evaluate import plot_ladder

    cfg = preset("tiny", steps=20, eval_every=10, ladder=("8", "16x1"))
    summary = train(cfg, DataConfig(), tmp_path / "lad", progress=False)
    assert {"universal@8x2", "universal@16x1"} <= set(summary["best_val_bits"])
    report = evaluate_run(tmp_path / "lad")
    sizes = [r["size"] for r in report["ladder"]]
    assert sizes == ["8x2", "16x1", "16x2"]  # sorted by parameters
    params = [r["params"] for r in report["ladder"]]
    assert params == sorted(params) and len(set(params)) == 3
    for row in report["ladder"]:
        assert 0 < row["projected"] < UNIFORM_BITS and 0 < row["universal"] < UNIFORM_BITS
        assert row["ratio"] == pytest.approx(row["projected"] / row["universal"])
    _, model, _ = load_run(tmp_path / "lad")
    cfg16, w, _ = model.specialise("projected@16x1", 3)
    assert cfg16.n_layer == 1 and "h1.wq" not in w
    png = plot_ladder(report, tmp_path / "ladder.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ladder_sizes_the_source_cannot_hold_are_refused(tmp_path):
    with pytest.raises(ProjectableEdgeError, match=r"width 64.*wider than the source"):
        preset("tiny", ladder=("64",))
    with pytest.raises(ProjectableEdgeError, match="3 layers.*more layers than the source"):
        preset("tiny", ladder=("16x3",))
    with pytest.raises(ProjectableEdgeError, match="bad small size"):
        preset("tiny", ladder=("wide",))
    with pytest.raises(ProjectableEdgeError, match="more layers"):
        preset("tiny", small="16x5")
    assert not any(tmp_path.iterdir())


def test_changing_the_operator_never_moves_a_baseline(tmp_path):
    """Each role has its own generator and its own optimizer: the universal's training is bit-identical
    across operator designs, while the projected model does change."""
    runs = {}
    for mixture, k in (("shared", 4), ("per_space", 6)):
        cfg = preset("tiny", steps=6, eval_every=3, mixture=mixture, n_basis=k)
        runs[mixture] = train(cfg, DataConfig(), tmp_path / mixture, progress=False)["best_val_bits"]
    for role in ("universal", "scratch"):
        assert runs["shared"][role] == runs["per_space"][role], role
    assert runs["shared"]["projected"] != runs["per_space"]["projected"]


def test_base_preset_smoke(tmp_path):
    """The GPU preset (source 8 layers, small 4: fewer layers) builds and takes a few steps on the CPU."""
    cfg = preset("base", steps=2, batch_size=4, eval_every=2, warmup_steps=1)
    assert cfg.source.n_layer == 8 and cfg.small.n_layer == 4
    summary = train(cfg, DataConfig(), tmp_path / "base", progress=False)
    assert all(np.isfinite(v) for v in summary["best_val_bits"].values())
    _, model, _ = load_run(tmp_path / "base")
    assert model.projector.layers == [0, 2, 4, 6]
    c, w, _ = model.specialise("projected", 0)
    assert c.n_layer == 4 and set(w) == set(__import__("projectable_edge.model").model.weight_shapes(c))


def test_mnist_trains(tmp_path):
    cfg = preset("tiny", steps=20, eval_every=10)
    summary = train(cfg, DataConfig("mnist"), tmp_path / "mn", progress=False)
    assert all(v < UNIFORM_BITS - 0.5 for v in summary["best_val_bits"].values())
    meta, _, data = load_run(tmp_path / "mn")
    assert meta["data"]["dataset"] == "mnist" and data.n_tasks == 10


@pytest.mark.slow
def test_fewer_layers_projected_model_is_bundled_like_any_other(tmp_path):
    """A small size with fewer layers than the source goes through export, quantization and generate."""
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    run = tmp_path / "shallow"
    train(preset("tiny", steps=10, eval_every=10, small="16x1"), DataConfig(), run, progress=False)
    res = CliRunner().invoke(app, ["generate", "--task", "3", "--target", "x86-64-cpu", "--source", str(run),
                                   "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["candidates"][manifest["selected"]]["model"]["n_layer"] == 1
    import projectable_edge_runtime as runtime

    model = runtime.load(tmp_path / "b")
    bits = model.score(load_run(run)[2].split("test", 3)[:4])
    assert bits.shape == (4,) and np.all((bits > 0) & (bits < UNIFORM_BITS))


def test_cli_refuses_a_ladder_size_the_source_cannot_hold(tmp_path):
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--ladder", "16,64", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    text = " ".join(res.output.split())  # rich wraps long lines
    assert "width 64" in text and "wider than the source" in text and "Traceback" not in text
    assert text.endswith("within the source's: here WIDTH <= 16 and LAYERS <= 2")  # the fix, whole
    assert not (tmp_path / "x").exists() and not partial_dir(tmp_path / "x").exists()


def test_a_finished_run_needs_no_data_source(tmp_path):
    """The run keeps its exact splits: with its image folder gone it still loads, and the light load
    (source + operators only, no splits) projects exactly what the full load projects."""
    from PIL import Image

    from projectable_edge.data import load_dataset

    digits = load_dataset(DataConfig())
    folder = tmp_path / "imgs"
    for t in range(3):
        (folder / f"t{t}").mkdir(parents=True)
        for i, tok in enumerate(digits.split("train", t)[:12]):
            Image.fromarray((tok.reshape(8, 8) * 15).astype(np.uint8), mode="L").save(folder / f"t{t}" / f"{i}.png")
    run = tmp_path / "run"
    train(replace(preset("tiny"), steps=4, eval_every=2), DataConfig(dataset=str(folder)), run, progress=False)
    meta, full, data = load_run(run)
    shutil.rmtree(folder)
    _, again, data2 = load_run(run)
    for s in ("train", "val", "test"):
        assert np.array_equal(data.split(s), data2.split(s))
    meta_light, light, none = load_run(run, data=False, baselines=False)
    assert none is None and light.roles == ("source", "projected")
    assert meta_light["weights_sha256"] == meta["weights_sha256"]
    for role, task in (("projected", 2), ("source", 1)):
        a, b = full.specialise(role, task), light.specialise(role, task)
        assert all(torch.equal(a[1][k], b[1][k]) for k in a[1]) and torch.equal(a[2], b[2])
    with pytest.raises(ProjectableEdgeError, match="not loaded"):
        light.specialise("universal", 0)
    (run / "splits.npz").write_bytes(b"not a snapshot")
    with pytest.raises(ProjectableEdgeError, match="snapshot"):
        load_run(run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(ProjectableEdgeError, match="newer projectable-edge"):
        load_run(run)


def _hand_slice(w: dict, src, small, task_vec: torch.Tensor):
    """Weight selection written out by hand: the first d_s residual coordinates, the first head_dim_s of
    each of the first n_head_s heads, the first d_mlp_s hidden units; small layer j from source layer
    round(j * L / L_s). Independent of the Projector's code."""
    d, m = small.d_model, small.d_mlp
    att = [h * src.head_dim + i for h in range(small.n_head) for i in range(small.head_dim)]
    out = {"wte": w["wte"][:, :d], "wpe": w["wpe"][:, :d], "lnf.w": w["lnf.w"][:d], "lnf.b": w["lnf.b"][:d],
           "head": w["head"][:d], "head_b": w["head_b"]}
    for j in range(small.n_layer):
        p, q = f"h{j}.", f"h{min(src.n_layer - 1, round(j * src.n_layer / small.n_layer))}."
        for n in ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "bo", "b2"):
            out[p + n] = w[q + n][:d]
        for n in ("wq", "wk", "wv"):
            out[p + n] = w[q + n][:d][:, att]
        for n in ("bq", "bk", "bv"):
            out[p + n] = w[q + n][att]
        out[p + "wo"] = w[q + "wo"][att][:, :d]
        out[p + "w1"], out[p + "b1"] = w[q + "w1"][:d, :m], w[q + "b1"][:m]
        out[p + "w2"] = w[q + "w2"][:m, :d]
    return out, task_vec[:d]


EXTRA = replace(preset("tiny"), steps=20, extra_steps=20, eval_every=10, checkpoint_every=10)


def test_the_sliced_universal_starts_at_the_hand_sliced_trained_source(tmp_path):
    from projectable_edge.model import SpecialisedModel

    run = tmp_path / "x"
    train(EXTRA, DataConfig(), run, progress=False)
    meta, model, data = load_run(run)
    assert {"universal@ws", "universal@ws+kd"} <= set(model.roles)
    # the second stage freezes the source, so the run's source is the one the models were sliced from
    vx, vt = data.splits["val"]
    macro = []
    for t in range(data.n_tasks):
        w, bos = _hand_slice(model.source.weights(), model.src_cfg, model.small_cfg, model.source_task[t].detach())
        macro.append(SpecialisedModel(model.small_cfg, {k: v.detach() for k, v in w.items()}, bos).bits(vx[vt == t]).mean())
    start = [h for h in json.loads((run / "history.json").read_text())["history"]
             if h["stage"] == "extra" and h["step"] == EXTRA.steps and "universal@ws" in h["val_bits"]]
    assert len(start) == 1
    for role in ("universal@ws", "universal@ws+kd"):
        assert start[0]["val_bits"][role] == pytest.approx(float(np.mean(macro)), abs=1e-5)
    # ... and then trained: the kept weights are no longer the slice
    w, _ = _hand_slice(model.source.weights(), model.src_cfg, model.small_cfg, model.source_task[0])
    assert not torch.equal(model.specialise("universal@ws", 0)[1]["h0.wq"], w["h0.wq"])


def test_the_second_stage_trains_every_small_model_on_the_universal_batches(tmp_path, monkeypatch):
    from projectable_edge.trainables import Trainables

    seen: dict[str, list] = {}
    real = Trainables.logits

    def spy(self, role, tokens, task_ids):
        if self.training:
            seen.setdefault(role, []).append((tokens.clone(), task_ids.clone()))
        return real(self, role, tokens, task_ids)

    monkeypatch.setattr(Trainables, "logits", spy)
    train(EXTRA, DataConfig(), tmp_path / "x", progress=False)
    assert len(seen["universal@ws"]) == len(seen["universal@ws+kd"]) == EXTRA.extra_steps
    second = seen["universal"][EXTRA.steps:]  # the universal model's second-stage steps
    assert len(second) == EXTRA.extra_steps
    for role in ("universal@ws", "universal@ws+kd", "projected", "scratch"):
        batches = seen[role][-EXTRA.extra_steps:]
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, second)), role
    # the frozen source is still run in the second stage, as the distillation teacher only
    assert len(seen["source"]) == EXTRA.steps + EXTRA.extra_steps


def test_a_second_stage_from_a_finished_run_equals_the_two_stages_in_one(tmp_path):
    both = train(replace(EXTRA, delta=True), DataConfig(), tmp_path / "both", progress=False)
    first = train(replace(EXTRA, extra_steps=0), DataConfig(), tmp_path / "first", progress=False)
    second = train(replace(EXTRA, delta=True), DataConfig(), tmp_path / "second", from_run=tmp_path / "first",
                   progress=False)
    assert second["best_val_bits"] == pytest.approx(both["best_val_bits"], abs=1e-6)
    _, a, _ = load_run(tmp_path / "first")
    _, b, _ = load_run(tmp_path / "second")
    assert torch.equal(a.source.weights()["h1.w2"], b.source.weights()["h1.w2"])  # the source stays frozen
    assert b.projector.delta["h0__wq"].abs().sum() > 0  # the shared delta learned in the second stage
    with pytest.raises(ProjectableEdgeError, match="first stage differs"):
        train(replace(EXTRA, lr=1e-3), DataConfig(), tmp_path / "bad", from_run=tmp_path / "first", progress=False)
    with pytest.raises(ProjectableEdgeError, match="--extra-steps"):
        train(replace(EXTRA, extra_steps=0), DataConfig(), tmp_path / "bad", from_run=tmp_path / "first", progress=False)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("stop_at", [20, 30])  # at the end of the joint stage, and inside the second
def test_resume_continues_across_the_two_stages(tmp_path, monkeypatch, stop_at):
    import projectable_edge.train as tr

    cfg = replace(EXTRA, delta=True)
    full = train(cfg, DataConfig(), tmp_path / "full", progress=False)
    real = tr.save_state

    def save_then_stop(path, model, opts, best, step):
        real(path, model, opts, best, step)
        if step == stop_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(tr, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, DataConfig(), tmp_path / "r", progress=False)
    monkeypatch.setattr(tr, "save_state", real)
    resumed = train(cfg, DataConfig(), tmp_path / "r", resume=True, progress=False)
    assert resumed["best_val_bits"] == pytest.approx(full["best_val_bits"], abs=1e-5)


def test_a_run_that_is_missing_or_a_file_is_a_clear_error(tmp_path):
    with pytest.raises(ProjectableEdgeError, match=r"run folder .*nope not found; give a folder written by"):
        load_run(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProjectableEdgeError, match=r"run folder .*file is a file, not a folder"):
        load_run(tmp_path / "file")


@pytest.mark.parametrize("text", ["[]", "null", '"s"'])
def test_a_run_config_that_is_not_a_json_object_is_refused(tiny_run, tmp_path, text):
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.json").write_text(text)
    with pytest.raises(ProjectableEdgeError, match=r"config\.json must be a JSON object written by projectable-edge"):
        load_run(run)
    res = CliRunner().invoke(app, ["tasks", str(run)])
    assert res.exit_code == 2 and "must be a JSON object" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("key,tamper,expect", [
    ("small_model", {"n_head": 0}, r"'small_model': model field 'n_head' must be a whole number in 1\.\."),
    ("small_model", {"d_model": -32}, r"model field 'd_model' must be a whole number in 1\.\."),
    ("source_model", {"n_layer": 10**9}, r"'source_model': model field 'n_layer' must be a whole number in 1\.\.1024"),
    ("small_model", {"block_size": float("nan")}, "model field 'block_size' must be .*got nan"),
    ("small_model", "x", "'small_model': a model config must be a JSON object"),
    ("small_model", None, "'small_model': a model config must be a JSON object"),  # deleted
    ("small_model", {"d_model": 24}, r"'small_model' disagrees with its 'train' .*d_model 24 \(expected 16\)"),
    ("task_names", [], "'task_names' must be a list of one or more names"),
    ("format_version", "2", "format_version must be a whole number"),
    ("tokenizer", {"levels": 0}, r"config\.json: tokenizer spec field 'levels' must be in 2\.\.256, got 0; copy"),
    ("data", [], r"config\.json: the data config must be a JSON object of its fields, got \[\]"),
    ("projection", {"n_basis": 99}, r"config\.json: 'projection' is not the operator its 'train' field gives"),
    ("projection", "x", r"config\.json: 'projection' is not the operator"),
])
def test_a_run_config_with_bad_model_sizes_is_refused(tiny_run, tmp_path, key, tamper, expect):
    """Bundles copy these fields, so a hand-edited value is refused when the run is read, naming it."""
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / "config.json").read_text())
    if tamper is None:
        del config[key]
    else:
        config[key] = {**config[key], **tamper} if isinstance(tamper, dict) else tamper
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ProjectableEdgeError, match=expect):
        load_run(run)
    res = CliRunner().invoke(app, ["tasks", str(run)])  # listing the tasks reads the same checks
    assert res.exit_code == 2 and re.search(expect, " ".join(res.output.split())), res.output


def test_a_split_snapshot_that_is_not_an_npz_archive_is_named_so(tiny_run, tmp_path):
    import io

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    npy = io.BytesIO()
    np.save(npy, np.zeros(3))
    for junk in (np.random.default_rng(0).bytes(4096), npy.getvalue()):
        (run / "splits.npz").write_bytes(junk)
        with pytest.raises(ProjectableEdgeError, match=r"splits\.npz is not a split snapshot \(not a \.npz archive\)"):
            load_run(run)


def test_a_split_snapshot_with_a_damaged_member_is_named_so(tiny_run, tmp_path):
    import zipfile

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    raw = bytearray((run / "splits.npz").read_bytes())
    with zipfile.ZipFile(run / "splits.npz") as z:  # np.savez stores members uncompressed, checked by CRC
        info = z.getinfo("test.tokens.npy")
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 200] ^= 0xFF
    (run / "splits.npz").write_bytes(raw)
    with pytest.raises(ProjectableEdgeError, match=r"splits\.npz is not a readable split snapshot .*CRC"):
        load_run(run)


def test_cli_refuses_a_negative_seed_and_an_empty_ladder(tmp_path):
    from typer.testing import CliRunner

    from projectable_edge.cli import app

    for args, expect in ((["--seed", "-1"], "training option 'seed' must be an integer in 0.."),
                         (["--ladder", ",,,"], "the ladder (--ladder) names no size"),
                         (["--ladder", "16,,8"], "the ladder (--ladder) has an empty size in '16,,8'"),
                         (["--image-size", "0"], "'--image-size'"), (["--levels", "1"], "'--levels'")):
        res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--steps", "2", *args,
                                       "--out", str(tmp_path / "x")])
        assert res.exit_code == 2, res.output
        assert expect in " ".join(res.output.split()) and "Traceback" not in res.output
    assert not any(tmp_path.iterdir())
    for kw in ({"seed": -1}, {"seed": 2**64}, {"ladder": ()}, {"ladder": " , "}, {"ladder": "16,"},
               {"ladder": ("8", "")}):
        with pytest.raises(ProjectableEdgeError, match="seed|ladder"):
            preset("tiny", **kw)
    for kw, expect in (({"lam": float("inf")}, "'lam' must be a finite number >= 0, got inf"),  # trained to NaN
                       ({"distill": float("nan")}, "'distill' must be a finite number >= 0"),
                       ({"kd": -1.0}, "'kd' must be a finite number >= 0, got -1.0"),
                       ({"batch_size": 10**8}, "'batch_size' must be at most")):  # was an allocator error
        with pytest.raises(ProjectableEdgeError, match=expect):
            preset("tiny", **kw)
    with pytest.raises(ProjectableEdgeError, match="data 'seed' must be an integer in 0.."):
        DataConfig(seed=-1)


def test_a_projected_model_that_is_missing_or_not_a_json_object_is_named(tiny_run, tmp_path):
    with pytest.raises(ProjectableEdgeError, match=r"nope\.json not found: give a projected model written by "
                                                   "`projectable-edge project`"):
        load_projected(tmp_path / "nope")
    small, info = project_task(tiny_run, 3)
    _, js = save_projected(tmp_path / "p", small, info)
    js.write_text("[]")
    with pytest.raises(ProjectableEdgeError, match=r"p\.json must be a JSON object written by projectable-edge"):
        load_projected(tmp_path / "p")
