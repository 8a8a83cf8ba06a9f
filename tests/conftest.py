"""Shared fixtures.

Runtime fixtures (prefix `rt_`): a tiny SpecialisedModel exported once per session to the
two graphs a bundle holds, and bundles built from them with the runtime's own writer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

RT_CFG = dict(vocab_size=17, block_size=64, n_layer=2, n_head=2, d_model=16, d_attn=16, d_mlp=32)


def _export_rt_graphs(out: Path) -> dict:
    """Export score + decode graphs of a tiny model; return paths, goldens and reference bits."""
    import warnings

    import torch

    from projectable_edge.model import DecodeWrapper, ModelConfig, SpecialisedModel, bits_per_dim, init_weights

    cfg = ModelConfig(**RT_CFG)
    g = torch.Generator().manual_seed(0)
    w = init_weights(cfg, g)
    w["head"] = w["head"] * 40  # peaked logits: greedy/argmax comparisons are meaningful, not ties
    w["wte"] = w["wte"] * 20
    model = SpecialisedModel(cfg, w, torch.randn(cfg.d_model, generator=g)).eval()
    tok = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=g)
    pk = torch.zeros(cfg.n_layer, 2, cfg.n_head, 3, cfg.head_dim)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (tok,), str(out / "score.onnx"), input_names=["tokens"], output_names=["logits"],
                          dynamic_axes={"tokens": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
                          dynamo=True, verbose=False, external_data=False)
        torch.onnx.export(DecodeWrapper(model), (tok[:, :1], pk, pk.clone()), str(out / "decode.onnx"),
                          input_names=["token", "past_keys", "past_values"],
                          output_names=["logits", "present_keys", "present_values"],
                          dynamic_axes={"token": {0: "batch"}, "past_keys": {1: "batch", 3: "past"},
                                        "past_values": {1: "batch", 3: "past"}, "logits": {0: "batch"},
                                        "present_keys": {1: "batch", 3: "total"},
                                        "present_values": {1: "batch", 3: "total"}},
                          dynamo=True, verbose=False, external_data=False)
    goldens = torch.randint(0, cfg.vocab_size, (12, cfg.block_size), generator=g)
    with torch.no_grad():
        ref = bits_per_dim(model(goldens), goldens).double().numpy()
    return {"score": out / "score.onnx", "decode": out / "decode.onnx", "cfg": RT_CFG,
            "goldens": goldens.numpy(), "ref_bits": ref}


def build_rt_bundle(dest: Path, graphs: dict, target: str = "x86-64-cpu", variants=("fp32", "int8-static"),
                    selected: str = "fp32", engine: dict | None = None, extra_files: dict | None = None,
                    decode: bool = True, overwrite: bool = False) -> Path:
    """Write a bundle with the runtime's own writer (staged_bundle + write_manifest).

    Every variant points at its own copy of the same fp32 graphs: the runtime must not care
    what a variant is called, only what the manifest says about it.
    """
    from devices.profiles import load_profile
    from runtime.manifest import staged_bundle, write_manifest

    cfg = graphs["cfg"]
    ref = float(graphs["ref_bits"].mean())
    with staged_bundle(dest, overwrite=overwrite) as tmp:
        entries = {}
        for v in variants:
            (tmp / "graphs" / v).mkdir(parents=True)
            shutil.copyfile(graphs["score"], tmp / "graphs" / v / "score.onnx")
            if decode:
                shutil.copyfile(graphs["decode"], tmp / "graphs" / v / "decode.onnx")
            entries[v] = {"score": f"graphs/{v}/score.onnx", "decode": f"graphs/{v}/decode.onnx" if decode else None}
        np.savez(tmp / "goldens.npz", tokens=graphs["goldens"], ref_bits=graphs["ref_bits"])
        for rel, data in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        write_manifest(tmp, {
            "task": {"name": "tiny-task", "index": 3},
            "target": load_profile(target).to_dict(),
            "tokenizer": {"height": 8, "width": 8, "channels": 1, "levels": cfg["vocab_size"]},
            "model": {"n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "head_dim": cfg["d_attn"] // cfg["n_head"],
                      "vocab_size": cfg["vocab_size"], "block_size": cfg["block_size"], "bos_id": cfg["vocab_size"]},
            "io": {},
            "graphs": entries,
            "selected": selected,
            "engine": engine or {"status": "not-applicable"},
            "accuracy": {"reference_bits": ref, "tolerance": 0.01,
                         "variants": {v: {"bits": ref, "delta": 0.0} for v in variants}},
            "latency_host": {}, "tools": {"onnxruntime": "test"}, "provenance": {"source": "tests/conftest.py"},
        })
    return dest


@pytest.fixture(scope="session")
def rt_graphs(tmp_path_factory):
    return _export_rt_graphs(tmp_path_factory.mktemp("rt_graphs"))


@pytest.fixture(scope="session")
def rt_bundle(rt_graphs, tmp_path_factory) -> Path:
    """A valid bundle (read-only by convention: copy it with rt_bundle_copy before changing it)."""
    return build_rt_bundle(tmp_path_factory.mktemp("rt_bundles") / "tiny-task__x86-64-cpu", rt_graphs)


@pytest.fixture
def rt_bundle_copy(rt_bundle, tmp_path) -> Path:
    dest = tmp_path / rt_bundle.name
    shutil.copytree(rt_bundle, dest)
    return dest


@pytest.fixture(scope="session")
def rt_build():
    """The bundle builder, for tests that need a bundle with other settings (target, engine, ...)."""
    return build_rt_bundle


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny-preset run on digits (a few seconds), shared by training and pipeline tests."""
    from projectable_edge.config import preset
    from projectable_edge.data import DataConfig
    from projectable_edge.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(preset("tiny"), DataConfig(), out, progress=False)
    return out
