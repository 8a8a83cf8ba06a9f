"""Tiny models, synthetic task tokens and their exported graphs, shared by the tests and benchmarks.

Random-init models give near-uniform logits, which hide quantization error; a few dozen
Adam steps on structured synthetic images give peaked, realistic logits in about a second.
Test support, so it lives with the tests (benchmarks put this folder on sys.path).
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from projectable_edge.model import ModelConfig, SpecialisedModel, forward, init_weights, nll

TINY = ModelConfig(vocab_size=17, block_size=64, n_layer=2, n_head=2, d_model=16, d_attn=16, d_mlp=32)
SMALL = ModelConfig(vocab_size=17, block_size=64, n_layer=4, n_head=4, d_model=32, d_attn=32, d_mlp=128)


def synthetic_tokens(n: int, seed: int = 0, side: int = 8, levels: int = 17) -> np.ndarray:
    """[n, side*side] int64 images of 1-3 bright bars with soft edges and a little noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((n, side, side))
    top = levels - 1
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            k = rng.integers(1, side - 1)
            sl = (slice(None), k) if rng.random() < 0.5 else (k, slice(None))
            edge = [(slice(None), k - 1), (slice(None), k + 1)] if isinstance(sl[0], slice) else \
                   [(k - 1, slice(None)), (k + 1, slice(None))]
            img[i][sl] = np.maximum(img[i][sl], top)
            for e in edge:
                img[i][e] = np.maximum(img[i][e], top // 2)
    img += rng.integers(-1, 2, img.shape) * (rng.random(img.shape) < 0.1)
    return np.clip(img, 0, top).astype(np.int64).reshape(n, side * side)


def peaked_model(cfg: ModelConfig = TINY, seed: int = 0) -> SpecialisedModel:
    """A random model with sharpened embeddings and head: peaked logits, so greedy decoding varies."""
    g = torch.Generator().manual_seed(seed)
    w = init_weights(cfg, g)
    w["head"] = w["head"] * 40
    w["wte"] = w["wte"] * 20
    for k, v in w.items():  # distinct gains and biases, as after training (identical initializers get merged)
        if v.dim() == 1:
            w[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    return SpecialisedModel(cfg, w, torch.randn(cfg.d_model, generator=g)).eval()


def tiny_trained_model(cfg: ModelConfig = TINY, steps: int = 60, seed: int = 0,
                       tokens: np.ndarray | None = None) -> SpecialisedModel:
    """A SpecialisedModel trained `steps` Adam steps on synthetic tokens (CPU, ~1 s for TINY)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only add contention
    try:
        return _train(cfg, steps, seed, tokens)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ModelConfig, steps: int, seed: int, tokens: np.ndarray | None) -> SpecialisedModel:
    g = torch.Generator().manual_seed(seed)
    w = {k: v.requires_grad_() for k, v in init_weights(cfg, g).items()}
    bos = (torch.randn(cfg.d_model, generator=g) * 0.02).requires_grad_()
    data = torch.from_numpy(synthetic_tokens(512, seed) if tokens is None else tokens)
    opt = torch.optim.Adam([*w.values(), bos], lr=1e-2)
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (32,), generator=g)]
        loss = nll(forward(w, cfg, batch, bos.expand(len(batch), -1)), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return SpecialisedModel(cfg, {k: v.detach() for k, v in w.items()}, bos.detach()).eval()


# ----------------------------------------------------------------------------- shared, cached artifacts
# pytest runs every test module in one process; exporting costs seconds, so the tiny model, its
# export and its quantized variants are built once here and shared (read-only) by all tests.



@dataclass(frozen=True)
class TinyExport:
    model: SpecialisedModel
    train: np.ndarray  # calibration tokens
    heldout: np.ndarray
    dir: Path
    scoring: Path
    decode: Path
    report: dict


@functools.lru_cache(maxsize=None)
def _workdir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="pe-export-test-"))
    atexit.register(shutil.rmtree, d, True)
    return d


@functools.lru_cache(maxsize=None)
def tiny_export() -> TinyExport:
    """The trained TINY model exported (with parity) once per process."""
    from projectable_edge.exporters.onnx_export import export_onnx

    model = tiny_trained_model(steps=120)
    train, heldout = synthetic_tokens(256, seed=5), synthetic_tokens(64, seed=99)
    art, report = export_onnx(model, None, _workdir() / "export", heldout=heldout, log=lambda s: None)
    return TinyExport(model, train, heldout, art.dir, art.scoring, art.decode, report)


@functools.lru_cache(maxsize=None)
def tiny_variant(graph: str, precision: str, activation_type: str = "int8") -> tuple[Path, dict]:
    """A quantized variant of tiny_export()'s graph, validated against the model (cached)."""
    from projectable_edge.exporters.quantize import QuantizeSettings, quantize

    ex = tiny_export()
    out = _workdir() / f"{graph}_{precision}_{activation_type}.onnx"
    return quantize(getattr(ex, graph), QuantizeSettings(precision=precision, activation_type=activation_type),
                    out, calibration=ex.train, heldout=ex.heldout, model=ex.model)


@functools.lru_cache(maxsize=None)
def peaked_export() -> TinyExport:
    """peaked_model() exported (with parity) once per process: the graphs of the runtime's test bundles."""
    from projectable_edge.exporters.onnx_export import export_onnx

    model = peaked_model()
    g = torch.Generator().manual_seed(1)
    heldout = torch.randint(0, TINY.vocab_size, (12, TINY.block_size), generator=g).numpy()
    art, report = export_onnx(model, None, _workdir() / "peaked", heldout=heldout, log=lambda s: None)
    return TinyExport(model, heldout, heldout, art.dir, art.scoring, art.decode, report)


@functools.lru_cache(maxsize=None)
def peaked_variant(graph: str, precision: str) -> Path:
    """A registry variant of peaked_export()'s graph, built by the real converter (cached)."""
    from projectable_edge.exporters.quantize import QuantizeSettings, quantize

    ex = peaked_export()
    out = _workdir() / f"peaked_{graph}_{precision}.onnx"
    path, _ = quantize(getattr(ex, graph), QuantizeSettings(precision=precision, on_budget_fail="report"), out,
                       calibration=ex.train, heldout=ex.heldout)
    return path


def sample_graph(path: Path, n: int, seed: int = 0, temperature: float = 1.0) -> np.ndarray:
    """n full sequences sampled through a graph file (decode: KV cache; scoring: recompute) by the runtime's sampler."""
    from projectable_edge.exporters.onnx_io import load_onnx
    from projectable_edge.exporters.spec import read_spec
    from projectable_edge_runtime.graphs.runners import OrtRunner
    from projectable_edge_runtime.graphs.sampler import sample

    spec = read_spec(load_onnx(path))
    return sample(OrtRunner(path, threads=1), spec.layout, n, spec.block_size, temperature=temperature, seed=seed)


def without_softmax(path: Path, out: Path) -> Path:
    """The graph with its first Softmax replaced by an Identity (an op removed with the onnx package): the causal
    mask's -inf then reaches the attention product, and the graph gives NaN."""
    model = onnx.load(str(path))
    i, node = next((i, n) for i, n in enumerate(model.graph.node) if n.op_type == "Softmax")
    model.graph.node.remove(node)
    model.graph.node.insert(i, onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]], name="removed"))
    onnx.save(model, str(out))
    return out
