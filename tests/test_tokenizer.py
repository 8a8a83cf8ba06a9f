import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.commands.png import image_grid, png_bytes, write_png
from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec

GRAY = TokenizerSpec(4, 5, 1, 17)
RGB = TokenizerSpec(3, 2, 3, 8)


def test_spec_properties_and_dict_round_trip():
    assert GRAY.seq_len == 20 and GRAY.vocab_size == 17
    assert RGB.seq_len == 18 and RGB.vocab_size == 8
    d = json.loads(json.dumps(RGB.to_dict()))
    assert d == {"height": 3, "width": 2, "channels": 3, "levels": 8}
    assert TokenizerSpec.from_dict(d) == RGB


@pytest.mark.parametrize("bad, field", [
    ({"height": 8, "width": 8, "channels": 2, "levels": 17}, "channels"),
    ({"height": "8", "width": 8, "channels": 1, "levels": 17}, "height"),
    ({"height": 8, "width": 8, "channels": 1, "levels": 1}, "levels"),
    ({"height": 8, "width": 8, "channels": 1}, "levels"),
    ({"height": 8, "width": 8, "channels": 1, "levels": 17, "depth": 3}, "depth"),
])
def test_spec_from_dict_names_bad_field(bad, field):
    with pytest.raises(ProjectableEdgeError, match=field):
        TokenizerSpec.from_dict(bad)


@pytest.mark.parametrize("spec", [GRAY, RGB, TokenizerSpec(2, 2, 1, 256), TokenizerSpec(2, 3, 3, 2)])
def test_tokens_decode_encode_round_trip(spec):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, spec.levels, (7, spec.seq_len))
    images = spec.decode(tokens)
    assert images.dtype == np.uint8 and images.shape == (7,) + spec.image_shape
    assert np.array_equal(spec.encode(images), tokens)
    ends = spec.decode(np.array([[0] * (spec.seq_len - 1) + [spec.levels - 1]]))
    assert ends.reshape(-1)[0] == 0 and ends.reshape(-1)[-1] == 255


def test_encode_quantization_and_error_bound():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    spec = TokenizerSpec(16, 16, 1, 17)
    t = spec.encode(x)
    assert t.dtype == np.int64 and t.shape == (1, 256)
    assert np.array_equal(t[0], np.floor(np.arange(256) / 255 * 16 + 0.5).astype(np.int64))
    assert t[0, 0] == 0 and t[0, 255] == 16
    err = np.abs(spec.decode(t).astype(int) - x.astype(int))
    assert err.max() <= 255 / 16 / 2 + 0.5


def test_encode_of_a_large_batch_holds_its_tokens_and_no_more():
    """Scoring a large batch of images peaked at twice the int64 tokens (three arrays of them); the input is
    left as it was."""
    import tracemalloc

    x = np.random.default_rng(0).integers(0, 256, (20000, 4, 5), dtype=np.uint8)
    want = (x.astype(np.int64).reshape(len(x), -1) * 32 + 255) // 510
    for images in (x, x.astype(np.int64)):
        before = images.copy()
        tracemalloc.start()
        try:
            tokens = GRAY.encode(images)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        np.testing.assert_array_equal(tokens, want)
        np.testing.assert_array_equal(images, before)
        assert peak < 1.2 * tokens.nbytes


def test_rgb_raster_order_channels_interleaved():
    spec = TokenizerSpec(1, 2, 3, 256)  # 256 levels: token == pixel value
    img = np.array([[[[10, 20, 30], [40, 50, 60]]]], dtype=np.uint8)  # [N=1, H=1, W=2, C=3]
    assert spec.encode(img).tolist() == [[10, 20, 30, 40, 50, 60]]
    assert np.array_equal(spec.decode(np.array([10, 20, 30, 40, 50, 60])), img[0])  # single sequence


def test_decode_single_sequence_gray():
    t = np.arange(20) % 17
    assert GRAY.decode(t).shape == (4, 5)
    assert np.array_equal(GRAY.decode(t), GRAY.decode(t[None])[0])


def test_encode_accepts_gray_with_channel_axis():
    x = np.full((2, 4, 5, 1), 255, np.uint8)
    assert (GRAY.encode(x) == 16).all()


@pytest.mark.parametrize("images, needle", [
    (np.zeros((2, 4, 6), np.uint8), "expected [N, 4, 5]"),  # wrong width
    (np.zeros((2, 4, 5, 3), np.uint8), "(2, 4, 5, 3)"),  # rgb into gray spec
    (np.zeros((4, 5), np.uint8), "images[None]"),  # single image without batch axis
    (np.zeros((2, 4, 5), np.float32), "float32"),
    (np.full((2, 4, 5), 300, np.int64), "300"),
    (np.full((2, 4, 5), 0.5), "scale 0..1 to 0..255 with (x * 255).round()"),  # clip + astype would make it black
    (np.ones((2, 4, 5), bool), "scale 0..1 to 0..255"),
    (np.full((2, 4, 5), 1.5), "np.clip(x, 0, 255)"),
])
def test_encode_bad_input_says_expected_and_got(images, needle):
    with pytest.raises(ProjectableEdgeError) as e:
        GRAY.encode(images)
    assert needle in str(e.value)


def test_encode_rgb_wrong_channels():
    with pytest.raises(ProjectableEdgeError, match=r"\(1, 3, 2, 4\).*expected \[N, 3, 2, 3\]"):
        RGB.encode(np.zeros((1, 3, 2, 4), np.uint8))


def test_check_tokens_out_of_range_names_min_max_and_range():
    t = np.zeros((2, 20), np.int64)
    t[0, 3], t[1, 7] = -2, 19
    with pytest.raises(ProjectableEdgeError) as e:
        GRAY.check_tokens(t)
    msg = str(e.value)
    assert "min -2" in msg and "max 19" in msg and "0..16" in msg
    with pytest.raises(ProjectableEdgeError, match="0..16"):
        GRAY.decode(np.full(20, 17))


def test_check_tokens_wrong_length_and_dtype():
    with pytest.raises(ProjectableEdgeError, match=r"\(3, 21\).*\[N, 20\]"):
        GRAY.check_tokens(np.zeros((3, 21), np.int64))
    with pytest.raises(ProjectableEdgeError, match="float"):
        GRAY.check_tokens(np.zeros(20, np.float64))
    ok = GRAY.check_tokens(np.zeros((1, 20), np.int32))
    assert ok.dtype == np.int64


def test_load_images_resizes_converts_and_names_bad_file(tmp_path):
    Image.new("RGB", (10, 8), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("L", (2, 2), 255).save(tmp_path / "white.png")
    rgb = RGB.load_images([tmp_path / "red.png", tmp_path / "white.png"])
    assert rgb.shape == (2, 3, 2, 3) and rgb.dtype == np.uint8
    assert (rgb[0] == [255, 0, 0]).all() and (rgb[1] == 255).all()
    gray = GRAY.load_images([tmp_path / "red.png"])
    assert gray.shape == (1, 4, 5) and (gray == 76).all()  # ITU-R 601 luma of pure red
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ProjectableEdgeError, match="broken.png"):
        GRAY.load_images([tmp_path / "red.png", tmp_path / "broken.png"])


def test_an_unreadable_image_says_to_make_it_readable(tmp_path, monkeypatch):
    """(root reads a chmod 000 file, so the refusal the file system gives another user is simulated)"""
    Image.new("L", (2, 2), 255).save(tmp_path / "locked.png")

    def refused(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", refused)
    with pytest.raises(ProjectableEdgeError, match=r"cannot read image '.*locked\.png' \(Permission denied\): make it "
                                                   "readable by this user"):
        GRAY.load_images([tmp_path / "locked.png"])


def test_load_images_flattens_transparency_onto_white(tmp_path):
    Image.new("RGBA", (4, 5), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (GRAY.load_images([tmp_path / "clear.png"]) == 255).all()


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.full((5, 4), 40000, np.uint16)).save(tmp_path / "g16.png")  # I;16: 40000/257 = 155.6
    assert (RGB.load_images([tmp_path / "g16.png"]) == 156).all()
    assert (TokenizerSpec(4, 5, 1, 256).load_images([tmp_path / "g16.png"]) == 156).all()
    old = Image.fromarray(np.full((5, 4), 65535, np.int32))  # how older Pillows open a 16-bit gray PNG
    old.format = "PNG"
    assert np.asarray(GRAY.prepare_image(old)).tolist() == [[255] * 5] * 4


def test_a_transparent_grey_goes_white_in_sixteen_bits_as_in_eight(tmp_path):
    for bits, dtype, clear in ((8, np.uint8, 10), (16, np.uint16, 2570)):
        Image.fromarray(np.array([[clear] * 5, [0] * 5] * 2, dtype)).save(tmp_path / f"t{bits}.png",
                                                                           transparency=clear)
        assert GRAY.load_images([tmp_path / f"t{bits}.png"])[0, :, 0].tolist() == [255, 0, 255, 0], bits


def test_sixteen_bit_pgm_is_scaled_like_a_sixteen_bit_png(tmp_path):
    """Pillow opens a PGM with maxval > 255 as "I", scaled to 0..65535 (not 32-bit data: it was refused as such)."""
    (tmp_path / "g16.pgm").write_bytes(b"P5\n4 5\n65535\n" + np.full((5, 4), 40000, ">u2").tobytes())
    (tmp_path / "g1000.pgm").write_bytes(b"P5\n4 5\n1000\n" + np.full((5, 4), 500, ">u2").tobytes())
    assert (GRAY.load_images([tmp_path / "g16.pgm"]) == 156).all()
    assert (GRAY.load_images([tmp_path / "g1000.pgm"]) == 128).all()  # 500/1000 of 255


def test_an_image_of_several_frames_is_refused_and_one_frame_is_read(tmp_path):
    frames = [Image.new("L", (4, 5), v) for v in (0, 255)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    frames[1].save(tmp_path / "one.gif")
    frames[1].save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=frames[:1])  # photo first
    for name in ("anim.gif", "pages.tif"):
        with pytest.raises(ProjectableEdgeError, match=rf"'.*{name}': it has 2 frames .*save the one frame"):
            GRAY.load_images([tmp_path / name])
    assert (GRAY.load_images([tmp_path / "one.gif", tmp_path / "camera.jpg"]) >= 250).all()


def test_thirty_two_bit_pixels_are_refused_unless_they_fit_a_byte(tmp_path):
    Image.fromarray(np.full((5, 4), 0.5, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((5, 4), 70000, np.int32)).save(tmp_path / "i.tif")
    Image.fromarray(np.full((5, 4), 200, np.int32)).save(tmp_path / "byte.tif")
    for name in ("f.tif", "i.tif"):
        with pytest.raises(ProjectableEdgeError, match=rf"{name}.*32-bit.*save it as an 8- or 16-bit image"):
            GRAY.load_images([tmp_path / name])
    assert (GRAY.load_images([tmp_path / "byte.tif"]) == 200).all()


def test_runtime_modules_import_without_torch_or_pillow():
    code = ("import sys, projectable_edge_runtime.graphs.tokenizer, projectable_edge_runtime.commands.png; "
            "bad = [m for m in ('torch', 'PIL') if m in sys.modules]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 3), (1, 1)])
def test_write_png_reads_back_identical(tmp_path, shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    out = write_png(tmp_path / "sub" / "x.png", img)
    with Image.open(out) as im:
        assert im.mode == ("RGB" if len(shape) == 3 else "L")
        assert np.array_equal(np.asarray(im), img)
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]  # no temp file left behind


def test_write_png_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ProjectableEdgeError, match="uint8"):
        write_png(tmp_path / "a.png", np.zeros((2, 2), np.float32))
    with pytest.raises(ProjectableEdgeError, match=r"\(2, 2, 4\)"):
        png_bytes(np.zeros((2, 2, 4), np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_image_grid_layout_scale_and_padding():
    imgs = np.stack([np.full((2, 3), v, np.uint8) for v in (10, 20, 30)])
    imgs[0, 0, 0] = 99
    g = image_grid(imgs, cols=2, pad=1, scale=2, pad_value=7)
    assert g.shape == (2 * 4 + 3, 2 * 6 + 3)
    assert (g[1:5, 1:7][:2, :2] == 99).all()  # one source pixel -> a 2x2 block
    assert (g[1:5, 8:14] == 20).all()  # row 0, col 1
    assert (g[6:10, 1:7] == 30).all()  # row 1, col 0
    assert (g[6:10, 8:14] == 7).all()  # empty cell stays padding
    assert (g[0] == 7).all() and (g[:, 7] == 7).all() and (g[5] == 7).all()


def test_image_grid_rgb_and_bad_args():
    imgs = np.zeros((4, 2, 2, 3), np.uint8)
    imgs[3] = [1, 2, 3]
    g = image_grid(imgs, cols=4, pad=0)
    assert g.shape == (2, 8, 3) and (g[:, 6:8] == [1, 2, 3]).all()
    assert image_grid(imgs, cols=10, pad=0).shape == (2, 8, 3)  # cols clamp to N
    with pytest.raises(ProjectableEdgeError, match="scale"):
        image_grid(imgs, cols=2, scale=0)
    with pytest.raises(ProjectableEdgeError, match=r"\(2, 2\)"):
        image_grid(np.zeros((2, 2), np.uint8), cols=1)
