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


def _measured(bundle: Path, rel: str, goldens: np.ndarray) -> float:
    """A graph's bits/dim on the goldens, as generate records it."""
    from projectable_edge_runtime.graphs.runners import OrtRunner
    from projectable_edge_runtime.graphs.scoring import score_tokens

    return float(score_tokens(OrtRunner(bundle / rel), goldens).mean())


def build_rt_bundle(dest: Path, graphs: dict, target: str = "x86-64-cpu", variants=("fp32", "int8-static"),
                    selected: str = "fp32", engine: dict | None = None, extra_files: dict | None = None,
                    decode: bool = True, overwrite: bool = False, budgets: dict | None = None,
                    task: dict | None = None, recorded: dict | None = None, ref_shift: float = 0.0,
                    files: dict | None = None) -> Path:
    """Write a bundle with the runtime's own writer (staged_bundle + write_manifest of a typed Manifest).

    Every variant holds the graphs the exporter wrote for it (tests/tiny_models.py); the bits recorded in the
    manifest are measured (or `recorded`: {variant: bits}), the reference is the PyTorch model's (shifted by
    `ref_shift` bits/dim), so validation means something. Candidates are named 16x2/VARIANT. `files`:
    {variant: (scoring graph, decode graph)} to ship other graphs under a variant's name.
    """
    import dataclasses

    from projectable_edge_runtime.devices import variants as registry
    from projectable_edge_runtime.devices.profiles import load_profile
    from projectable_edge_runtime.bundle.manifest import (SCHEMA_VERSION, Accuracy, Candidate, Engine, EngineStatus, Graphs,
                                                   Manifest, ModelFacts, Selection, Task, decode as parse_as,
                                                   staged_bundle, write_manifest)
    from projectable_edge_runtime.bundle.requirements import requires_for
    from projectable_edge_runtime.graphs.tokenizer import TokenizerSpec

    cfg = graphs["cfg"]
    ref_bits = graphs["ref_bits"] + ref_shift
    ref = float(ref_bits.mean())
    profile = load_profile(target)
    profile = dataclasses.replace(profile, budgets=dataclasses.replace(profile.budgets, **(budgets or {})))
    facts = ModelFacts(cfg["n_layer"], cfg["n_head"], cfg["d_attn"] // cfg["n_head"], cfg["vocab_size"],
                       cfg["block_size"], cfg["vocab_size"], cfg["d_model"], 1000)
    with staged_bundle(dest, overwrite=overwrite) as tmp:
        cands = {}
        for v in variants:
            (tmp / "graphs" / v).mkdir(parents=True)
            src = (files or {}).get(v) or (_variant_graph(graphs, v, "scoring"), _variant_graph(graphs, v, "decode"))
            shutil.copyfile(src[0], tmp / "graphs" / v / "score.onnx")
            if decode:
                shutil.copyfile(src[1], tmp / "graphs" / v / "decode.onnx")
            g = Graphs(f"graphs/{v}/score.onnx", f"graphs/{v}/decode.onnx" if decode else None)
            bits = (recorded or {}).get(v, _measured(tmp, g.score, graphs["goldens"]))
            rel = registry.get(v).tolerance_rel if v in registry.VARIANTS else registry.DEVICE_DRIFT_REL
            acc = Accuracy(reference_bits=ref, tolerance=rel * ref, tolerance_rel=rel, within_budget=True, bits=bits,
                           passed=abs(bits - ref) <= rel * ref, vs_fp32=0.0)
            cands[f"16x2/{v}"] = Candidate("16x2", v, True, "projected", facts, g, "goldens.npz", acc)
        np.savez(tmp / "goldens.npz", tokens=graphs["goldens"], ref_bits=ref_bits)
        for rel_path, data in (extra_files or {}).items():
            (tmp / rel_path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel_path).write_bytes(data)
        write_manifest(tmp, Manifest(
            schema_version=SCHEMA_VERSION, task=Task(**(task or {"name": "tiny-task", "index": 3})), target=profile,
            tokenizer=TokenizerSpec(8, 8, 1, cfg["vocab_size"]), candidates=cands, selected=f"16x2/{selected}",
            selection=Selection("tests/conftest.py", "chosen by the test", {}),
            engine=parse_as(Engine, {"reason": "tests", **engine}, "engine") if engine else Engine(EngineStatus.NOT_APPLICABLE, "tests"),
            requires=requires_for(), task_test_bits={"projected": ref}, provenance={"source": "tests/conftest.py"}))
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
