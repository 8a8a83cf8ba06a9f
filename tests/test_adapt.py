"""`adapt`: a new task from a handful of images, on a tiny run that never saw it."""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from projectable_edge import ProjectableEdgeError
from projectable_edge.adapt import AdaptConfig, adapt, fit, score
from projectable_edge.checkpoint import load_tensors
from projectable_edge.cli import app
from projectable_edge.config import preset
from projectable_edge.data import DataConfig, load_dataset
from projectable_edge.task_registry import adapted_names, load_adapted
from projectable_edge.train import load_run, train

HELD = "7"


def _bits(specialised, tokens: np.ndarray) -> float:
    """A role's specialised (config, weights, bos) scored in PyTorch: the reference every check uses."""
    from projectable_edge.model import SpecialisedModel

    return float(SpecialisedModel(*specialised).bits(tokens).mean())


def data_index(run: Path, name: str) -> int:
    return json.loads((run / "config.json").read_text())["task_names"].index(name)


@pytest.fixture(scope="module")
def held_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapt") / "run"
    train(preset("tiny"), DataConfig(hold_out=(HELD,)), out, progress=False)
    return out


def _write_pngs(folder: Path, tokens: np.ndarray, spec, mode: str = "L", size: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(spec.decode(tokens)):
        Image.fromarray(img).resize((size, size)).convert(mode).save(folder / f"{i:03d}.png")
    return folder


def _held_images(n: int) -> np.ndarray:
    data = load_dataset(DataConfig(hold_out=(HELD,)))
    return data.held_out[HELD]["train"][:n]


def test_hold_out_removes_the_task_and_keeps_the_others_splits(tmp_path):
    full, held = load_dataset(DataConfig()), load_dataset(DataConfig(hold_out=(HELD,)))
    assert HELD not in held.task_names and held.n_tasks == full.n_tasks - 1
    for s in ("train", "test"):  # the remaining tasks keep exactly their images, renumbered
        assert np.array_equal(held.split(s, "8"), full.split(s, "8"))
        assert np.array_equal(held.held_out[HELD][s], full.split(s, HELD))
    assert set(held.splits["train"][1].tolist()) == set(range(held.n_tasks))
    with pytest.raises(ProjectableEdgeError, match="cannot hold out"):
        load_dataset(DataConfig(hold_out=("eleven",)))
    # given but empty (an unset shell variable): refused, not a run that silently holds out nothing
    res = CliRunner().invoke(app, ["train", "--preset", "tiny", "--hold-out-task", "", "--out",
                                   str(tmp_path / "run")])
    assert res.exit_code == 2 and "name no task" in res.output and not (tmp_path / "run").exists(), res.output
    with pytest.raises(ProjectableEdgeError, match="name no task"):
        DataConfig(hold_out=" , ")
    assert DataConfig.from_dict(DataConfig().to_dict()).hold_out == ()


def test_adapt_registers_a_task_that_tasks_lists_and_generate_accepts(held_run, tmp_path):
    from projectable_edge.pipeline import GenerateSettings, generate
    from projectable_edge_runtime import load

    spec = load_dataset(DataConfig()).spec
    imgs = _write_pngs(tmp_path / "sevens", _held_images(20), spec, mode="RGB", size=28)
    _, model, _ = load_run(held_run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_bytes = (held_run / "model.safetensors").read_bytes()

    res = CliRunner().invoke(app, ["adapt", str(held_run), "--images", str(imgs), "--name", "sevens", "--json",
                                   "--force"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["n_images"] == 20 and rec["n_check"] == 4 and "RGB 28x28" in rec["conversion"]
    # the recorded numbers are re-measured independently: the registered model and the nearest trained task
    # on the held-out check images
    at = load_adapted(held_run, "sevens")
    check = at.tokens[at.check]
    assert score(model, "projected", at.adapted, check) == pytest.approx(rec["bits"], rel=1e-5)
    near = model.specialise("projected", data_index(held_run, rec["nearest_task"]))
    assert _bits(near, check) == pytest.approx(rec["nearest_bits"], rel=1e-5)
    # the run's files and every weight of source and operator are bit-identical afterwards
    assert (held_run / "model.safetensors").read_bytes() == run_bytes
    _, model_after, _ = load_run(held_run)
    after = model_after.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    listed = json.loads(CliRunner().invoke(app, ["tasks", str(held_run), "--json"]).stdout)["tasks"]
    assert [t["name"] for t in listed if t["kind"] == "adapted"] == ["sevens"]
    assert HELD not in [t["name"] for t in listed if t["kind"] == "trained"]

    from projectable_edge.project import project_task

    small, info = project_task(held_run, "sevens")
    assert info["task_index"] is None and info["adapted"]["n_images"] == 20
    x = torch.from_numpy(load_adapted(held_run, "sevens").goldens())
    assert torch.equal(small(x), load_adapted(held_run, "sevens").model(model_after)(x))

    bundle = tmp_path / "bundle"
    path, manifest = generate(GenerateSettings(task="sevens", target="jetson", source=held_run, out=bundle,
                                               bench_runs=3, samples=4, cache=False), log=lambda m: None)
    assert manifest.task.name == "sevens" and manifest.task.index is None
    assert manifest.provenance["adapted"]["n_images"] == 20
    at = load_adapted(held_run, "sevens")
    t = load_tensors(held_run / "tasks" / "sevens" / "task.safetensors", kind="adapted-task")
    assert torch.equal(t["vector"], at.adapted.vector) and at.tokens.shape == (20, 64)
    # the bundle's fp32 graph scores the held-out images as the registered model does in PyTorch
    got = float(load(path, precision="fp32").score(at.goldens()).mean())
    assert abs(got - manifest.task_test_bits["projected"]) < 1e-3


def test_adapted_embedding_beats_its_start_on_held_out_images(held_run):
    """With 40 images the fit moves the embedding and scores the held-out check images strictly better than
    the nearest trained task it started from (re-measured here, not taken from the fit's own record)."""
    _, model, data = load_run(held_run)
    x = _held_images(40)
    a = fit(model, "projected", x, data.spec, AdaptConfig(steps=60))
    check = x[list(a.check)]
    assert len(a.check) == 8 and not torch.equal(a.vector, model.source_task[a.nearest])
    fitted, start = score(model, "projected", a, check), _bits(model.specialise("projected", a.nearest), check)
    assert fitted == pytest.approx(a.bits, rel=1e-5) and start == pytest.approx(a.nearest_bits, rel=1e-5)
    assert fitted < start
    others = load_dataset(DataConfig(hold_out=(HELD,))).held_out[HELD]["test"]
    assert np.isfinite(score(model, "projected", a, others))


@pytest.mark.parametrize("case", ["clash", "index_clash", "too_few", "empty", "not_images", "bad_name", "exists",
                                  "newline_name", "huge_image"])
def test_bad_input_is_refused_and_registers_nothing(held_run, tmp_path, case):
    spec = load_dataset(DataConfig()).spec
    imgs = _write_pngs(tmp_path / "imgs", _held_images(10), spec)
    name, expect = "newtask", ""
    if case == "clash":
        name, expect = "3", "clashes with a task"
    elif case == "index_clash":  # the held-out task's own name: not in the list of trained names the message gave
        name, expect = HELD, f"task name '{HELD}' is also the index of the trained task '8'"
    elif case == "too_few":
        for p in sorted(imgs.iterdir())[2:]:
            p.unlink()
        expect = "at least 3"
    elif case == "empty":
        shutil.rmtree(imgs)
        imgs.mkdir()
        expect = "has no images"
    elif case == "not_images":
        (imgs / "000.png").write_bytes(b"not a png")
        expect = "cannot read image"
    elif case == "bad_name":
        name, expect = "../escape", "is not usable"
    elif case == "newline_name":  # a regex's $ takes a trailing newline: the folder's name would hold one
        name, expect = "sevens\n", "is not usable"
    elif case == "huge_image":  # a PNG header claiming 20000x20000 pixels: Pillow's decompression-bomb guard
        def chunk(kind: bytes, data: bytes) -> bytes:
            return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

        ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
        (imgs / "000.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"")
                                       + chunk(b"IEND", b""))
        expect = "cannot read image"
    elif case == "exists":
        (held_run / "tasks" / "taken").mkdir(parents=True, exist_ok=True)
        (held_run / "tasks" / "taken" / "task.json").write_text("{}")
        name, expect = "taken", "already has an adapted task"
    before = adapted_names(held_run)
    res = CliRunner().invoke(app, ["adapt", str(held_run), "--images", str(imgs), "--name", name])
    assert res.exit_code == 2, res.output
    assert expect in res.output and "Traceback" not in res.output
    assert adapted_names(held_run) == before
    assert not list((held_run / "tasks").glob(".*")) if (held_run / "tasks").exists() else True  # no temp leftovers
    if case == "exists":
        shutil.rmtree(held_run / "tasks" / "taken")


def test_an_unknown_task_names_the_adapted_ones(held_run):
    _, _, data = load_run(held_run)
    from projectable_edge.project import project_task

    with pytest.raises(ProjectableEdgeError, match="valid tasks"):
        project_task(held_run, "nope")



@pytest.mark.parametrize("what", ["embedding", "norms", "all"])
def test_fit_never_touches_the_run_and_restores_its_grad_flags(held_run, what):
    _, model, data = load_run(held_run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = fit(model, "projected", _held_images(10), data.spec, AdaptConfig(steps=20, fit=what))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert a.curve[0]["step"] == 0 and a.curve[-1]["step"] == 20
    assert a.bits == min(c["check"] for c in a.curve)  # early stopping keeps the best checked step
    if what == "embedding":
        assert not a.deltas
    if what == "norms":  # only norm gains and biases may get a delta (none if the weights never helped)
        assert all(k.split(".")[-1] in ("w", "b", "head_b") or k.endswith(("bq", "bk", "bv", "bo", "b1", "b2"))
                   for k in a.deltas)
        assert "h0.wq" not in a.deltas and "wte" not in a.deltas


def test_an_interrupted_register_leaves_nothing(held_run, tmp_path, monkeypatch):
    import projectable_edge.task_registry as reg

    spec = load_dataset(DataConfig()).spec
    imgs = _write_pngs(tmp_path / "imgs", _held_images(6), spec)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(reg, "save_json", boom)
    before = adapted_names(held_run)
    with pytest.raises(KeyboardInterrupt):
        adapt(held_run, imgs, "halfway", AdaptConfig(steps=5), log=lambda m: None)
    assert adapted_names(held_run) == before
    assert not (held_run / "tasks" / "halfway").exists() and not list((held_run / "tasks").glob(".*"))


def test_a_run_folder_that_cannot_be_written_is_refused_before_the_fit(held_run, tmp_path, monkeypatch):
    """A read-only run (a read-only mount, another user's run) was fitted first, then refused with 'choose a folder
    you can write to', though adapt takes no folder; it is now refused at once, saying to adapt a copy."""
    import os

    import projectable_edge.adapt as adapt_mod
    import projectable_edge.task_registry as reg

    spec = load_dataset(DataConfig()).spec
    imgs = _write_pngs(tmp_path / "imgs", _held_images(6), spec)
    run = tmp_path / "run"
    shutil.copytree(held_run, run)

    def refuse(folder):
        raise OSError(30, "Read-only file system")

    def no_fit(*a, **k):
        raise AssertionError("fitted before refusing")

    if os.geteuid() == 0:  # root writes anywhere: simulate the file system refusing
        monkeypatch.setattr(reg, "probe_writable", refuse)
    else:
        os.chmod(run, 0o555)
    monkeypatch.setattr(adapt_mod, "fit", no_fit)
    res = CliRunner().invoke(app, ["adapt", str(run), "--images", str(imgs), "--name", "ro"])
    os.chmod(run, 0o755)
    assert res.exit_code == 2, res.output
    flat = res.output.replace("\n", "")
    assert "not writable" in flat and "copy the run folder" in flat and "Traceback" not in flat
    assert not (run / "tasks" / "ro").exists() and adapted_names(run) == adapted_names(held_run)


def test_a_task_registered_meanwhile_by_another_adapt_is_kept_and_the_message_names_adapts_flag(held_run, tmp_path,
                                                                                                 monkeypatch):
    import projectable_edge.task_registry as reg

    spec = load_dataset(DataConfig()).spec
    imgs = _write_pngs(tmp_path / "imgs", _held_images(6), spec)
    save_json = reg.save_json

    def racing(path, record):  # another `adapt --name racer` publishes its task while this one writes
        save_json(path, record)
        (held_run / "tasks" / "racer").mkdir()
        (held_run / "tasks" / "racer" / "task.json").write_text("{}")

    monkeypatch.setattr(reg, "save_json", racing)
    with pytest.raises(ProjectableEdgeError, match=r"created by another process.*pass --force \(force=True"):
        adapt(held_run, imgs, "racer", AdaptConfig(steps=5), log=lambda m: None)
    assert [p.name for p in (held_run / "tasks" / "racer").iterdir()] == ["task.json"]
    shutil.rmtree(held_run / "tasks" / "racer")


def test_evaluate_reports_adapted_tasks(held_run, tmp_path):
    from projectable_edge.evaluate import evaluate_run

    spec = load_dataset(DataConfig()).spec
    imgs = _write_pngs(tmp_path / "imgs", _held_images(10), spec)
    adapt(held_run, imgs, "evalme", AdaptConfig(steps=10), force=True, log=lambda m: None)
    rows = {r["task"]: r for r in evaluate_run(held_run)["adapted"]}
    at = load_adapted(held_run, "evalme")
    assert rows["evalme"]["n_scored"] == len(at.check) == 2
    assert rows["evalme"]["projected"] == pytest.approx(at.record["bits"], abs=1e-4)  # re-measured, same number
    assert rows["evalme"]["nearest_projected"] == pytest.approx(at.record["nearest_bits"], abs=1e-4)


@pytest.mark.parametrize("args,expect", [(["--lr", "1e300"], "adapt 'lr' must be a number in (0, 1]"),
                                         (["--lr", "inf"], "adapt 'lr' must be a number in (0, 1]"),
                                         (["--seed", "-1"], "adapt 'seed' must be an integer in 0..")])
def test_out_of_range_options_are_refused_before_any_work(tmp_path, args, expect):
    res = CliRunner().invoke(app, ["adapt", str(tmp_path / "run"), "--images", str(tmp_path), "--name", "z", *args])
    assert res.exit_code == 2 and expect in " ".join(res.output.split()), res.output
    with pytest.raises(ProjectableEdgeError, match="'weight_lr' must be a number in"):
        AdaptConfig(weight_lr=float("nan"))


def test_an_adapted_task_record_that_is_not_a_json_object_is_refused(held_run):
    bad = held_run / "tasks" / "notjson"
    bad.mkdir(parents=True)
    (bad / "task.json").write_text("[]")
    try:
        res = CliRunner().invoke(app, ["tasks", str(held_run)])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "task.json must be a JSON object" in text and "`projectable-edge adapt`" in text
    finally:
        shutil.rmtree(bad)
