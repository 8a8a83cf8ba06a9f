import os
import re
import unicodedata

import numpy as np
import pytest
import torch
from PIL import Image

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.data import DIGITS_SPEC, DataConfig, TaskData, load_dataset, shift_augment
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec


@pytest.fixture(scope="module")
def digits() -> TaskData:
    return load_dataset(DataConfig())


def test_digits_tasks_tokens_and_splits(digits):
    assert digits.spec == DIGITS_SPEC and digits.n_tasks == 10
    assert digits.task_names == [str(i) for i in range(10)]
    total = 0
    for name in ("train", "val", "test"):
        tok, ids = digits.splits[name]
        assert tok.dtype == np.int64 and ids.dtype == np.int64 and tok.shape == (len(ids), 64)
        assert tok.min() == 0 and tok.max() == 16
        assert set(ids.tolist()) == set(range(10)), f"{name} misses a task"
        total += len(tok)
    assert total == 1797
    assert 0.75 < len(digits.splits["train"][0]) / total < 0.85


def test_digits_splits_disjoint(digits):
    """Each task's three splits together are exactly its images, each used once (a partition)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    for t in range(10):
        pool = d.data[d.target == t].astype(np.int64)
        parts = [digits.split(s, t) for s in ("train", "val", "test")]
        assert min(map(len, parts)) >= 1
        merged = np.concatenate(parts)
        assert sorted(r.tobytes() for r in merged) == sorted(r.tobytes() for r in pool)


def test_digits_deterministic_per_seed(digits):
    again = load_dataset(DataConfig(seed=0))
    other = load_dataset(DataConfig(seed=1))
    assert again.fingerprint == digits.fingerprint
    for s in ("train", "val", "test"):
        assert np.array_equal(again.splits[s][0], digits.splits[s][0])
    assert other.fingerprint != digits.fingerprint
    assert not np.array_equal(other.splits["test"][0], digits.splits["test"][0])


def test_task_index_and_split_by_task(digits):
    assert digits.task_index(3) == 3 and digits.task_index("3") == 3 and digits.task_index(np.int64(7)) == 7
    x = digits.split("val", "4")
    assert len(x) > 0 and np.array_equal(x, digits.splits["val"][0][digits.splits["val"][1] == 4])
    with pytest.raises(ProjectableEdgeError, match=r"'cat'.*0='0'.*9='9'"):
        digits.task_index("cat")
    with pytest.raises(ProjectableEdgeError, match="10"):
        digits.task_index(10)
    with pytest.raises(ProjectableEdgeError, match="train"):
        digits.split("holdout")


def test_a_held_out_task_by_name_is_not_read_as_an_index():
    held = load_dataset(DataConfig(hold_out="3"))
    assert held.task_names[3] == "4" and held.task_index("4") == 3
    with pytest.raises(ProjectableEdgeError, match=r"task '3' was held out of this run.*adapt"):
        held.task_index("3")  # was index 3: task '4', silently


def test_a_number_that_names_one_padded_task_and_indexes_another_is_refused():
    data = TaskData(["01", "02", "03"], TokenizerSpec(2, 2, 1, 2), {}, "")
    assert data.task_index("02") == 1 and data.task_index(1) == 1 and data.task_index("0") == 0
    with pytest.raises(ProjectableEdgeError, match=r"task '1' is ambiguous: task '01' has that number, and index 1 "
                                                   r"is task '02'; give the task's exact name"):
        data.task_index("1")  # was index 1: task '02', silently


def test_what_int_refuses_is_a_name_not_a_number():
    """"²".isdigit() is true and "--1" is digits after lstrip("-"), but int() refuses both: a task or folder named
    so was a ValueError traceback."""
    data = TaskData(["01", "²"], TokenizerSpec(2, 2, 1, 2), {}, "")
    assert data.task_index("²") == 1 and data.task_index("0") == 0 and data.task_index("-0") == 0
    for task in ("³", "--1"):
        with pytest.raises(ProjectableEdgeError, match=rf"unknown task '{task}'; valid tasks \(index=name\) are 0="):
            data.task_index(task)


def test_data_config_dict_round_trip_and_validation():
    cfg = DataConfig(dataset="/x/y", seed=3, height=4, width=6, channels=3, levels=8)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.spec == TokenizerSpec(4, 6, 3, 8)
    with pytest.raises(ProjectableEdgeError, match="colour"):
        DataConfig.from_dict({"dataset": "digits", "colour": 1})
    with pytest.raises(ProjectableEdgeError, match="levels"):
        DataConfig(levels=5)  # digits are fixed at 17 levels
    with pytest.raises(ProjectableEdgeError, match="val_frac"):
        DataConfig(val_frac=0.0)
    with pytest.raises(ProjectableEdgeError, match="channels"):
        DataConfig(dataset="/x", channels=2)
    for size, channels in ((1, 1), (1, 3)):  # 1 and 3 tokens per image: trained, then `generate` could not export
        with pytest.raises(ProjectableEdgeError, match=r"token\(s\); a model `generate` can export needs at least 4: "
                                                       r"use --image-size 2"):
            DataConfig(dataset="/x", height=size, width=size, channels=channels)
    assert DataConfig(dataset="/x", height=2, width=2).spec.seq_len == 4


def _folder(root, tasks=("cats", "dogs"), n=4):
    colours = {"cats": (255, 0, 0), "dogs": (0, 0, 255)}
    for task in tasks:
        (root / task).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (6, 5), colours.get(task, (0, 255, 0))).save(root / task / f"{i}.png")
    (root / "cats" / "notes.txt").write_text("not an image: ignored")
    return root


def test_image_folder_loads(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "__MACOSX" / "cats").mkdir(parents=True)  # what a zip made on macOS carries: not a task
    (root / "__MACOSX" / "cats" / "._0.png").write_bytes(b"\0\5\26\7")
    Image.new("RGB", (6, 5), (0, 0, 255)).save(root / "dogs" / "4.jfif", format="JPEG")  # a JPEG's other suffix
    (root / "dogs" / "5.heic").write_bytes(b"heic")
    (root / "dogs" / "Thumbs.db").write_bytes(b"\xd0\xcf")  # what Windows Explorer leaves: not named as skipped
    Image.new("RGB", (6, 5)).save(root / "stray.png")  # beside the task folders: not read, and said so
    with pytest.warns(UserWarning) as caught:
        data = load_dataset(DataConfig(dataset=str(root), height=3, width=4, channels=3, levels=8))
    said = [str(w.message) for w in caught]
    assert any(re.match(r"skipped 2 file\(s\) .*\(\.heic: 1, \.txt: 1\); images are read with", m) for m in said), said
    assert any(re.match(r"1 image\(s\) directly in '.*pets' are not read .*move them into the sub-folder", m)
               for m in said), said
    assert data.task_names == ["cats", "dogs"]
    assert data.spec == TokenizerSpec(3, 4, 3, 8)
    assert sum(len(data.splits[s][0]) for s in ("train", "val", "test")) == 9
    for s in ("train", "val", "test"):
        tok, ids = data.splits[s]
        assert tok.shape[1] == 36 and set(ids.tolist()) == {0, 1}
    cats = data.split("train", "cats")
    assert (cats.reshape(-1, 12, 3) == [7, 0, 0]).all()  # pure red -> max level in R only
    assert (data.split("test", 1).reshape(-1, 12, 3) == [0, 0, 7]).all()


def test_image_folder_gray_spec(tmp_path):
    root = _folder(tmp_path / "pets", n=3)
    data = load_dataset(DataConfig(dataset=str(root), height=2, width=2, channels=1, levels=4))
    assert data.splits["train"][0].shape == (2, 4) and data.spec.channels == 1


def test_unknown_dataset_name():
    with pytest.raises(ProjectableEdgeError) as e:
        load_dataset(DataConfig(dataset="cifar10"))
    assert "cifar10" in str(e.value) and "digits, mnist" in str(e.value) and "sub-folder" in str(e.value)


def test_missing_folder(tmp_path):
    with pytest.raises(ProjectableEdgeError, match=r"nope.*does not exist.*digits"):
        load_dataset(DataConfig(dataset=str(tmp_path / "nope")))


def test_folder_without_task_subfolders(tmp_path):
    Image.new("L", (4, 4)).save(tmp_path / "a.png")
    with pytest.raises(ProjectableEdgeError, match=r"no task sub-folders.*1 image"):
        load_dataset(DataConfig(dataset=str(tmp_path)))


def test_task_folder_with_no_images(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "empty").mkdir()
    with pytest.raises(ProjectableEdgeError, match=r"empty.*no images"):
        load_dataset(DataConfig(dataset=str(root)))


def test_task_folder_with_too_few_images(tmp_path):
    root = _folder(tmp_path / "pets", tasks=("cats", "dogs", "fish"), n=3)
    (root / "fish" / "2.png").unlink()
    with pytest.raises(ProjectableEdgeError, match=r"fish.*only 2 image.*at least 3"):
        load_dataset(DataConfig(dataset=str(root)))


def test_a_single_task_folder_says_two_are_needed(tmp_path):
    root = _folder(tmp_path / "pets", tasks=("cats",))
    with pytest.raises(ProjectableEdgeError, match=r"1 task\(s\) \['cats'\].*at least 2"):
        load_dataset(DataConfig(dataset=str(root)))


def test_images_only_in_nested_folders_are_pointed_at(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "dogs" / "2019").mkdir()
    for f in sorted((root / "dogs").glob("*.png")):
        f.rename(root / "dogs" / "2019" / f.name)
    with pytest.raises(ProjectableEdgeError, match=r"dogs' has no images.*Move the 4 image\(s\) in its own "
                                                   r"sub-folders up into it"):
        load_dataset(DataConfig(dataset=str(root)))


def test_names_that_are_not_utf8_are_refused_before_training(tmp_path):
    """Latin-1 names (an old zip) once trained, then every `generate` of the run failed writing its manifest."""
    root = _folder(tmp_path / "pets")
    os.rename(root / "cats", os.fsencode(root) + b"/caf\xe9")
    with pytest.raises(ProjectableEdgeError, match=r"b'caf\\xe9'.*not UTF-8 text.*rename"):
        load_dataset(DataConfig(dataset=str(root)))
    os.rename(os.fsencode(root) + b"/caf\xe9", root / "cats")
    link = os.fsdecode(os.fsencode(tmp_path) + b"/p\xe9ts")
    os.symlink(root, link)
    with pytest.raises(ProjectableEdgeError, match=r"dataset path .*not UTF-8 text.*symbolic link"):
        load_dataset(DataConfig(dataset=link))


def test_a_task_typed_in_composed_unicode_finds_a_decomposed_folder(tmp_path):
    """macOS writes folder names decomposed (e + combining accent); a terminal types the composed é."""
    root = _folder(tmp_path / "pets", tasks=("cats", "dogs", "fish"), n=3)
    os.rename(root / "fish", root / unicodedata.normalize("NFD", "café"))
    data = load_dataset(DataConfig(dataset=str(root)))
    assert data.task_index("café") == 0  # sorted: 'cafe\u0301' < 'cats'
    held = load_dataset(DataConfig(dataset=str(root), hold_out="café"))
    assert held.task_names == ["cats", "dogs"] and list(held.held_out) == [unicodedata.normalize("NFD", "café")]


def test_undecodable_image_named(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "dogs" / "bad.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(ProjectableEdgeError, match=r"bad\.jpg"):
        load_dataset(DataConfig(dataset=str(root)))


def test_shift_augment_shapes_identity_and_determinism(digits):
    x = torch.from_numpy(digits.splits["train"][0][:32])
    g = torch.Generator().manual_seed(0)
    y = shift_augment(x, DIGITS_SPEC, g, max_shift=1)
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert not torch.equal(y, x)
    assert torch.equal(shift_augment(x, DIGITS_SPEC, g, max_shift=0), x)
    y2 = shift_augment(x, DIGITS_SPEC, torch.Generator().manual_seed(0), max_shift=1)
    assert torch.equal(y, y2)
    with pytest.raises(ProjectableEdgeError, match="63"):
        shift_augment(x[:, :63], DIGITS_SPEC, g)


def _edge_shift(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Reference: content moves by (dy, dx), borders replicated."""
    h, w = img.shape[:2]
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (img.ndim - 2)
    p = np.pad(img, pad, mode="edge")
    return p[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]


def test_shifted_digit_matches_rolled_reference_on_interior(digits):
    x = digits.splits["train"][0][:64]
    y = shift_augment(torch.from_numpy(x), DIGITS_SPEC, torch.Generator().manual_seed(1)).numpy()
    seen = set()
    for a, b in zip(x.reshape(-1, 8, 8), y.reshape(-1, 8, 8)):
        fits = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                if np.array_equal(np.roll(a, (dy, dx), axis=(0, 1))[1:-1, 1:-1], b[1:-1, 1:-1])
                and np.array_equal(_edge_shift(a, dy, dx), b)]
        assert fits, "shifted digit matches no (dy, dx) in [-1, 1]^2"
        seen.update(fits)
    assert len(seen) >= 5  # the shifts really are random


def test_shift_rgb_channels_move_together():
    spec = TokenizerSpec(5, 6, 3, 16)
    x = torch.randint(0, 16, (40, spec.seq_len), generator=torch.Generator().manual_seed(0))
    y = shift_augment(x, spec, torch.Generator().manual_seed(2), max_shift=1).numpy()
    for a, b in zip(x.numpy().reshape(-1, 5, 6, 3), y.reshape(-1, 5, 6, 3)):
        fits = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if np.array_equal(_edge_shift(a, dy, dx), b)]
        assert len(fits) == 1  # random pixels: exactly one shift explains the output


def test_mnist_is_read_like_an_image_folder_of_its_pngs(tmp_path, monkeypatch):
    """--dataset mnist == the same MNIST images saved as PNGs and read through the folder loader."""
    from projectable_edge.data import _mnist_file

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    mn = load_dataset(DataConfig("mnist", height=8, width=8))
    assert mn.n_tasks == 10 and mn.spec == TokenizerSpec(8, 8, 1, 17)
    assert sum(len(mn.splits[s][0]) for s in ("train", "val", "test")) == 5000
    assert [int((mn.splits["train"][1] == t).sum()) for t in range(10)] == [400] * 10
    assert list((tmp_path / "cache" / "projectable-edge").glob("mnist5k-*-8x8x1-17.npz"))  # cached
    raw = np.loadtxt(_mnist_file(), delimiter=",", max_rows=40)
    folder = tmp_path / "mnist_pngs"
    for i, row in enumerate(raw):
        d = folder / str(int(row[-1]))
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row[:-1].reshape(28, 28).astype(np.uint8), mode="L").save(d / f"{i:03d}.png")
    spec = TokenizerSpec(8, 8, 1, 17)
    pngs = sorted(folder.glob("*/*.png"))
    from_folder = spec.encode(spec.load_images(pngs))
    all_mnist = {r.tobytes() for s in ("train", "val", "test") for r in mn.splits[s][0]}
    assert all(r.tobytes() in all_mnist for r in from_folder)
    again = load_dataset(DataConfig("mnist", height=8, width=8))  # from the cache: identical
    assert again.fingerprint == mn.fingerprint
    bigger = load_dataset(DataConfig("mnist", height=14, width=14, levels=9))
    assert bigger.splits["test"][0].shape[1] == 196 and bigger.splits["test"][0].max() <= 8
