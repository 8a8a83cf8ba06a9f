"""One-shot projection of a trained run to a single task, and the projected-model file format.

A projected model file is `<name>.safetensors` (the small model's weights plus its BOS
vector) next to `<name>.json` (model config, tokenizer spec, task, provenance).
"""

from __future__ import annotations

import time
from pathlib import Path

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.checkpoint import load_json, load_tensors, save_json, save_tensors
from projectable_edge.model import ModelConfig, SpecialisedModel
from projectable_edge.train import load_run
from projectable_edge.trainables import Trainables
from projectable_edge_runtime.bundle.manifest import sha256_file


def n_params(small: SpecialisedModel) -> int:
    """Parameters of a deployable model: its weights plus the task's BOS vector."""
    return sum(v.numel() for v in small.weights.values()) + small.cfg.d_model


def specialise(model: Trainables, role: str, task: int) -> SpecialisedModel:
    """The deployable single-task model of a role ('projected', 'universal', ..., 'projected@16x4'); for
    'projected' this is project(M, t). The role is checked by the model's role registry."""
    cfg, w, bos = model.specialise(role, task)
    return SpecialisedModel(cfg, w, bos)


def adapted_provenance(t) -> dict:
    """What a bundle or file says about an adapted task: from how many images, fitted how."""
    r = t.record
    return {"n_images": r["n_images"], "n_check": r["n_check"], "nearest_task": r["nearest_task"],
            "bits_check": r["bits"], "nearest_bits_check": r["nearest_bits"], "fit": r["fit"],
            "images_sha256": [i["sha256"] for i in r["images"]]}


def project_task(run: Path, task: str | int, role: str = "projected") -> tuple[SpecialisedModel, dict]:
    """Load a run and produce one task's small model, with the metadata a file or bundle needs."""
    from projectable_edge.task_registry import lookup_task

    meta, model, data = load_run(run)
    t = lookup_task(run, data, task)
    adapted = not isinstance(t, int)
    if adapted and role != "projected":
        raise ProjectableEdgeError(f"adapted task {t.name!r} exists for the projected role only, not {role!r}")
    project = (lambda: t.model(model)) if adapted else (lambda: specialise(model, role, t))
    project()  # the first call also pays torch's lazy start-up: time the second, as generate does
    start = time.perf_counter()
    small = project()
    ms = (time.perf_counter() - start) * 1000
    info = {
        "role": role,
        "task": t.name if adapted else data.task_names[t],
        "task_index": None if adapted else t,
        "adapted": adapted_provenance(t) if adapted else None,
        "model": small.cfg.to_dict(),
        "tokenizer": meta["tokenizer"],
        "task_names": meta["task_names"],
        "projection_ms": ms,
        "source_run": {"config": meta, "weights_sha256": sha256_file(Path(run) / "model.safetensors")},
    }
    return small, info


def _pair(path: Path) -> tuple[Path, Path]:
    """(weights, description) of the projected model named STEM, STEM.safetensors or STEM.json (a dot in STEM, as
    in m.v2, stays: with_suffix would drop it)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_projected(out: Path, small: SpecialisedModel, info: dict, overwrite: bool = False) -> tuple[Path, Path]:
    """Write `<out>.safetensors` + `<out>.json` (each atomically)."""
    weights = dict(small.weights)
    weights["bos"] = small.wte_ext[small.cfg.vocab_size]
    st, js = _pair(out)
    if not overwrite and (st.exists() or js.exists()):
        raise ProjectableEdgeError(f"{st} or {js} already exists: choose another --out or pass --overwrite")
    if overwrite and (st.exists() or js.exists()):  # an earlier projected model only, never a run's weights:
        try:  # its description says what the pair is (one read, not the weights)
            ours = load_json(js).get("format") == "projectable-edge-projected"
        except ProjectableEdgeError:
            ours = False
        if not ours:
            raise ProjectableEdgeError(f"{st if st.exists() else js} is not a projected model written by `project`, "
                                       "so --overwrite does not replace it; choose another --out")
    save_tensors(st, weights, kind="projected")
    save_json(js, {"format": "projectable-edge-projected", **info})
    return st, js


def load_projected(path: Path) -> tuple[SpecialisedModel, dict]:
    """Read a projected model file pair written by `save_projected` (no pickle anywhere)."""
    st, js = _pair(path)
    info = load_json(js, "a projected model written by `projectable-edge project` (STEM, STEM.json or "
                         "STEM.safetensors)")
    if info.get("format") != "projectable-edge-projected":
        raise ProjectableEdgeError(f"{js} is not a projected-model description")
    w = load_tensors(st, kind="projected")
    bos = w.pop("bos")
    cfg = ModelConfig.from_dict(info["model"])
    try:
        return SpecialisedModel(cfg, w, bos), info
    except KeyError as e:
        raise ProjectableEdgeError(f"{st} lacks weight {e}") from None

