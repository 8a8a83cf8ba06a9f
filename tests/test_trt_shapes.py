"""TensorRT build commands are derived from the model (block size) and the profile (batch limits),
checked statically against the graphs' own input names and ranks: TensorRT is not available here."""
from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest

from projectable_edge.exporters.tensorrt import TensorRTSettings, compile_tensorrt, strongly_typed, trtexec_command
from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.profiles import load_profile

SHAPE_FLAGS = ("minShapes", "optShapes", "maxShapes")


def parse_shapes(command: str) -> dict[str, dict[str, list[int]]]:
    """{min|opt|max: {input: dims}} from a trtexec command line."""
    out = {}
    for arg in shlex.split(command):
        m = re.match(r"--(min|opt|max)Shapes=(.*)", arg)
        if m:
            out[m.group(1)] = {name: [int(x) for x in dims.split("x")]
                               for name, dims in (p.split(":") for p in m.group(2).split(","))}
    return out


def graph_inputs(path: Path) -> dict[str, int]:
    """{input name: rank} of an ONNX graph."""
    g = onnx.load(str(path), load_external_data=False).graph
    return {i.name: len(i.type.tensor_type.shape.dim) for i in g.input}


def check_command(command: str, onnx_path: Path, seq: int, batch: dict, cache: tuple[int, int, int] | None):
    """The command's shapes name exactly the graph's inputs, with its ranks, cover `seq` tokens
    and the profile's batch limits, and optimise the cache at a typical (half) length."""
    shapes = parse_shapes(command)
    assert set(shapes) == {"min", "opt", "max"}, command
    inputs = graph_inputs(onnx_path)
    for point, s in shapes.items():
        assert set(s) == set(inputs), (point, s, inputs)
        assert all(len(dims) == inputs[n] for n, dims in s.items())
    for point in ("min", "opt", "max"):
        b = batch[point]
        if cache is None:
            assert shapes[point]["tokens"][0] == b
        else:
            L, H, hd = cache
            past = {"min": 0, "opt": seq // 2, "max": seq - 1}[point]
            assert shapes[point]["token"] == [b, 1]
            assert shapes[point]["past_keys"] == shapes[point]["past_values"] == [L, b, H, past, hd]
    if cache is None:
        assert shapes["min"]["tokens"][1] == 1 and shapes["max"]["tokens"][1] == seq == shapes["opt"]["tokens"][1]


@pytest.fixture(scope="module")
def graphs_256(tmp_path_factory):
    """A tiny model with a 256-token block (16x16 images), exported."""
    from projectable_edge.exporters.onnx_export import export_onnx
    from tiny_models import TINY, peaked_model

    cfg = dataclasses.replace(TINY, block_size=256)
    heldout = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 256))
    art, _ = export_onnx(peaked_model(cfg), None, tmp_path_factory.mktemp("e256") / "g", heldout=heldout,
                         log=lambda s: None)
    return cfg, art


@pytest.mark.parametrize("block", [64, 256])
def test_shapes_follow_the_graph_not_constants(block, graphs_256, tmp_path):
    from tiny_models import TINY, tiny_export

    cfg, art = (TINY, tiny_export()) if block == 64 else graphs_256
    settings = TensorRTSettings.from_profile(load_profile("jetson"))
    batch = {"min": 1, "opt": 1, "max": 32}
    for graph, cache in (("scoring", None), ("decode", (cfg.n_layer, cfg.n_head, cfg.head_dim))):
        src = getattr(art, graph)
        _, rep = compile_tensorrt(src, settings, tmp_path / graph)
        check_command(rep["command_line"], src, block, batch, cache)
        assert rep["block_size"] == block and rep["typing"] == "weak"  # fp32 graph: no QDQ


def test_agx_batch_limit_comes_from_its_profile(tmp_path):
    from tiny_models import tiny_export

    src = tiny_export().scoring
    _, rep = compile_tensorrt(src, TensorRTSettings.from_profile(load_profile("jetson-agx-orin")), tmp_path / "a")
    check_command(rep["command_line"], src, 64, {"min": 1, "opt": 1, "max": 64}, None)


def test_qdq_graphs_build_strongly_typed_where_tensorrt_supports_it(tmp_path):
    from projectable_edge.exporters.onnx_io import load_onnx
    from projectable_edge.exporters.spec import read_spec
    from tiny_models import tiny_variant

    qdq, _ = tiny_variant("scoring", "int8-static")
    spec = read_spec(load_onnx(qdq))
    v8, fp32 = variants.get("int8-static"), variants.get("fp32")
    new = TensorRTSettings(fp16=True, int8=True, tensorrt_version="10.3")
    old = dataclasses.replace(new, tensorrt_version="8.6")
    cmd = trtexec_command("g.onnx", "g.plan", new, spec, v8)
    assert "--stronglyTyped" in cmd and "--fp16" not in cmd and "--int8" not in cmd
    cmd = trtexec_command("g.onnx", "g.plan", old, spec, v8)  # TensorRT 8.6: weakly typed flags only
    assert "--stronglyTyped" not in cmd and "--fp16" in cmd and "--int8" in cmd
    assert strongly_typed(new, v8) and not strongly_typed(new, fp32) and not strongly_typed(old, v8)
    unknown = dataclasses.replace(new, tensorrt_version=None)  # read as TensorRT 10, as documented
    assert strongly_typed(unknown, v8) and "--stronglyTyped" in trtexec_command("g.onnx", "g.plan", unknown, spec, v8)
    _, rep = compile_tensorrt(qdq, new, tmp_path / "q")
    assert rep["typing"] == "strong" and "--stronglyTyped" in rep["command_line"]


def _image_folder(root: Path, side: int, per_task: int = 20) -> Path:
    from PIL import Image

    rng = np.random.default_rng(side)
    for task in ("a", "b"):
        (root / task).mkdir(parents=True)
        for i in range(per_task):
            img = np.zeros((side, side), np.uint8)
            k = int(rng.integers(1, side - 1))
            if task == "a":
                img[:, k] = 255
            else:
                img[k, :] = 255
            Image.fromarray(img).save(root / task / f"{i}.png")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("side", [8, 16])
def test_jetson_bundle_build_commands_cover_the_image(side, tmp_path):
    """An image folder of side x side images -> a Jetson bundle whose trtexec commands cover side*side
    tokens, name the graphs' own inputs, and whose manifest validates against the shipped schema."""
    import jsonschema

    from projectable_edge.config import preset
    from projectable_edge.data import DataConfig
    from projectable_edge.pipeline import GenerateSettings, generate
    from projectable_edge.train import train
    from projectable_edge_runtime.bundle.manifest import json_schema

    folder = _image_folder(tmp_path / "images", side)
    run = tmp_path / "run"
    train(preset("tiny", steps=3), DataConfig(str(folder), height=side, width=side), run, progress=False)
    bundle, m = generate(GenerateSettings(task="a", target="jetson", source=str(run), out=str(tmp_path / "b"),
                                          bench_runs=3, samples=2), log=lambda _: None)
    seq = side * side
    c = m.candidates[m.selected]
    assert c.model.block_size >= seq
    jsonschema.validate(json.loads((bundle / "manifest.json").read_text()), json_schema())
    variant = m.engine.variant
    assert variant == c.variant
    L, H, hd = c.model.n_layer, c.model.n_head, c.model.head_dim
    batch = {"min": 1, "opt": 1, "max": 32}
    for folder_name, key, cache in (("engine", "score", None), ("engine_decode", "decode", (L, H, hd))):
        script = (bundle / folder_name / "build_engine.sh").read_text()
        line = next(x for x in script.splitlines() if "maxShapes" in x or "--onnx" in x)
        assert line
        command = " ".join(s.strip().rstrip("\\") for s in script.split('"$TRTEXEC"', 1)[1].split("|")[0].splitlines())
        onnx_name = re.search(r"--onnx=(\S+)", command).group(1)
        check_command(command, bundle / folder_name / onnx_name, c.model.block_size, batch, cache)
        assert (bundle / folder_name / onnx_name).resolve() == (bundle / getattr(c.graphs, key)).resolve()  # shipped once
    typing = m.engine.typing
    assert typing == ("strong" if variant == "int8-static" else "weak")
    assert ("--stronglyTyped" in m.engine.trtexec) == (typing == "strong")
    top = (bundle / "build_engine.sh").read_text()
    assert "engine_record" in top and all(m.files[f].optional for f in ("report.md", "samples.png"))
