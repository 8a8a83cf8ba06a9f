"""A PyTorch model behind the runtime's runner contract: the reference parity compares the ONNX graph with."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from projectable_edge.exporters.protocol import ExportableModel
from projectable_edge_runtime.graphs.contract import GraphKind


@contextmanager
def torch_threads(n: int = 1):
    """Tiny models on shared CPUs: one torch thread is ~40x faster than fighting for two."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class TorchRunner:
    """Runs `model` as the `kind` graph would, numpy in and out. Callers wrap a whole comparison in
    `torch_threads()`: switching the pool per call would cost more than the tiny model's step."""

    def __init__(self, model: ExportableModel, kind: GraphKind):
        self.model, self.kind = model.eval(), kind
        self.name = f"pytorch:{type(model).__name__}"
        self.providers = [f"torch {torch.__version__} (eager, CPU)"]
        self.input_names, self.output_names = list(kind.inputs), list(kind.outputs)
        self.input_dtypes = {n: np.dtype(np.int64 if n.startswith("token") else np.float32) for n in kind.inputs}

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
        with torch.no_grad():
            outs = (self.model(*args),) if self.kind is GraphKind.SCORING else self.model.decode_step(*args)
        return {n: o.numpy() for n, o in zip(self.output_names, outs)}
