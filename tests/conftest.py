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


def _export_rt_graphs() -> dict:
    """The tiny peaked model's graphs, written by the real exporter (parity-checked), plus goldens."""
    import torch

    from projectable_edge.model import bits_per_dim
    from tiny_models import TINY, peaked_export

    assert TINY.to_dict() == RT_CFG
    ex = peaked_export()
    goldens = torch.from_numpy(ex.heldout)
    with torch.no_grad():
        ref = bits_per_dim(ex.model(goldens), goldens).double().numpy()
    return {"score": ex.scoring, "decode": ex.decode, "cfg": RT_CFG, "goldens": ex.heldout, "ref_bits": ref}


def _variant_graph(graphs: dict, variant: str, graph: str) -> Path:
    """fp32: the exported graph; a registry variant: built by its real converter; any other name: a copy."""
    from projectable_edge_runtime.devices.variants import VARIANTS
    from tiny_models import peaked_variant

    if variant in VARIANTS and variant != "fp32":
        return peaked_variant(graph, variant)
    return graphs["score" if graph == "scoring" else "decode"]


def _measured(bundle: Path, entries: dict, graphs: dict, ref: float) -> dict:
    """Each variant's bits/dim on the goldens, as generate records it."""
    from projectable_edge_runtime.runners import OrtRunner
    from projectable_edge_runtime.scoring import score_tokens

    out = {}
    for v, e in entries.items():
        bits = float(score_tokens(OrtRunner(bundle / e["score"]), graphs["goldens"]).mean())
        out[v] = {"bits": bits, "delta": bits - ref}
    return out


def build_rt_bundle(dest: Path, graphs: dict, target: str = "x86-64-cpu", variants=("fp32", "int8-static"),
                    selected: str = "fp32", engine: dict | None = None, extra_files: dict | None = None,
                    decode: bool = True, overwrite: bool = False, budgets: dict | None = None,
                    task: dict | None = None) -> Path:
    """Write a bundle with the runtime's own writer (staged_bundle + write_manifest).

    Every variant holds the graphs the exporter wrote for it (tests/tiny_models.py); bits and
    tolerances recorded in the manifest are measured, so validation means something.
    """
    from projectable_edge_runtime.devices.profiles import load_profile
    from projectable_edge_runtime.manifest import staged_bundle, write_manifest

    cfg = graphs["cfg"]
    ref = float(graphs["ref_bits"].mean())
    profile = load_profile(target).to_dict()
    profile["budgets"].update(budgets or {})
    with staged_bundle(dest, overwrite=overwrite) as tmp:
        entries = {}
        for v in variants:
            (tmp / "graphs" / v).mkdir(parents=True)
            shutil.copyfile(_variant_graph(graphs, v, "scoring"), tmp / "graphs" / v / "score.onnx")
            if decode:
                shutil.copyfile(_variant_graph(graphs, v, "decode"), tmp / "graphs" / v / "decode.onnx")
            entries[v] = {"score": f"graphs/{v}/score.onnx", "decode": f"graphs/{v}/decode.onnx" if decode else None}
        np.savez(tmp / "goldens.npz", tokens=graphs["goldens"], ref_bits=graphs["ref_bits"])
        for rel, data in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        write_manifest(tmp, {
            "task": task or {"name": "tiny-task", "index": 3},
            "target": profile,
            "tokenizer": {"height": 8, "width": 8, "channels": 1, "levels": cfg["vocab_size"]},
            "model": {"n_layer": cfg["n_layer"], "n_head": cfg["n_head"], "head_dim": cfg["d_attn"] // cfg["n_head"],
                      "vocab_size": cfg["vocab_size"], "block_size": cfg["block_size"], "bos_id": cfg["vocab_size"]},
            "io": {},
            "graphs": entries,
            "selected": selected,
            "engine": engine or {"status": "not-applicable"},
            "accuracy": {"reference_bits": ref, "tolerance": 0.01, "variants": _measured(tmp, entries, graphs, ref)},
            "latency_host": {}, "tools": {"onnxruntime": "test"}, "provenance": {"source": "tests/conftest.py"},
        })
    return dest


@pytest.fixture(scope="session")
def rt_graphs():
    return _export_rt_graphs()


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
