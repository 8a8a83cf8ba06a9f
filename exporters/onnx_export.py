"""ONNX export of an exporters.protocol.ExportableModel: a scoring graph and a KV-cache decode graph, with
torch.onnx's dynamo exporter (TorchScript cannot export the causal mask's data-dependent `tril` diagonal), which
also gives clean dynamic batch / seq / past axes, past length 0 included."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.onnx_io import check_tokens, quiet
from projectable_edge.exporters.protocol import ExportableModel
from projectable_edge.exporters.spec import GRAPHS, ExportSpec, attach_spec, read_spec, spec_from_onnx
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.bundle.manifest import file_info
from projectable_edge_runtime.graphs.contract import GraphKind

MIN_OPSET = 17
# how long the parent waits for a forked export before redoing it itself: at least 120 s, and 10x its own export
CHILD_PATIENCE_S, CHILD_PATIENCE_X = 120.0, 10.0
FILES = {str(k): k.file_name for k in GraphKind}
REPORT_FILE = "export_report.json"


@dataclass(frozen=True)
class ExportSettings:
    opset: int = 18  # the dynamo exporter's native opset; 17 is the floor (LayerNormalization)
    graphs: tuple[str, ...] = GRAPHS
    max_batch: int = 4096  # upper bound declared for the dynamic batch axis
    parity: bool = True
    tolerances: dict | None = None  # {output: {"atol":, "rtol":}} overriding the fp32 variant's tolerances

    def __post_init__(self):
        if self.opset < MIN_OPSET:
            raise ProjectableEdgeError(f"opset {self.opset} is too old: LayerNormalization needs opset >= {MIN_OPSET}")
        bad = [g for g in self.graphs if g not in GRAPHS]
        if bad or not self.graphs:
            raise ProjectableEdgeError(f"unknown graph(s) {bad or '[]'}: choose from {', '.join(GRAPHS)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ExportedGraphs:
    dir: Path
    paths: dict[str, Path]
    specs: dict[str, ExportSpec]

    @property
    def scoring(self) -> Path:
        return self.paths["scoring"]

    @property
    def decode(self) -> Path:
        return self.paths["decode"]


# Dim names written into the graphs' I/O (and so into each graph's ExportSpec).
_DIMS = {
    "scoring": {"tokens": ["batch", "seq"], "logits": ["batch", "seq", None]},
    "decode": {"token": ["batch", None], "past_keys": [None, "batch", None, "past", None],
               "past_values": [None, "batch", None, "past", None], "logits": ["batch", None],
               "present_keys": [None, "batch", None, "past + 1", None],
               "present_values": [None, "batch", None, "past + 1", None]},
}


class DecodeStep(torch.nn.Module):
    """A model's decode_step as `forward`, which is what torch.onnx exports."""

    def __init__(self, model: ExportableModel):
        super().__init__()
        self.model = model  # weights appear in the graph as "model.<name>"

    def forward(self, token, past_keys, past_values):
        return self.model.decode_step(token, past_keys, past_values)


def _name_dims(model: onnx.ModelProto, graph: str) -> None:
    """Our dim names, not the ones dynamo derives from torch's symbols."""
    for vi in [*model.graph.input, *model.graph.output]:
        for d, name in zip(vi.type.tensor_type.shape.dim, _DIMS[graph][vi.name]):
            if name is not None:
                d.dim_param = name


def _tidy(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces (bulk, and local paths in a shipped file) and give
    MatMul / Softmax nodes layer names (h0_wqkv/MatMul, h0_attn_scores/MatMul, head/MatMul), so
    quantization reports can say which layers stayed in float."""
    inits = {i.name for i in model.graph.initializer}
    layer, seen, used = "", {}, set()

    def unique(name: str) -> str:
        k, base = 1, name
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        return name

    for n in model.graph.node:
        del n.metadata_props[:]
        n.doc_string = ""
        if n.op_type == "MatMul":
            w = next((i for i in n.input if i in inits), None)
            if w is not None:
                w = w.rsplit(".", 1)[-1]  # the decode wrapper's weights are "model.h0_wqkv"
                n.name = unique(f"{w}/MatMul")
                layer = w.split("_")[0] + "_" if w.startswith("h") and "_" in w else ""
            else:  # activation x activation: the two attention products of the current block
                k = seen[layer] = seen.get(layer, 0) + 1
                n.name = unique(f"{layer}attn_{'scores' if k == 1 else 'values'}/MatMul")
        elif n.op_type == "Softmax":
            n.name = unique(f"{layer}attn_softmax/Softmax")
        else:
            used.add(n.name)


def _export_one(model: ExportableModel, graph: str, settings: ExportSettings) -> tuple[onnx.ModelProto, ExportSpec]:
    cfg, kind = model.cfg, GraphKind(graph)
    batch = torch.export.Dim("batch", min=1, max=settings.max_batch)
    if graph == "scoring":
        module, args = model, (torch.zeros(2, cfg.block_size, dtype=torch.long),)
        dyn = {"tokens": {0: batch, 1: torch.export.Dim("seq", min=1, max=cfg.block_size)}}
    else:
        module = DecodeStep(model)
        cache = torch.zeros(cfg.n_layer, 2, cfg.n_head, 3, cfg.head_dim)
        args = (torch.zeros(2, 1, dtype=torch.long), cache, cache.clone())
        past = torch.export.Dim("past", min=0, max=cfg.block_size - 1)
        dyn = {"token": {0: batch}, "past_keys": {1: batch, 3: past}, "past_values": {1: batch, 3: past}}
    try:
        with quiet(), torch.no_grad():
            prog = torch.onnx.export(module.eval(), args, dynamo=True, input_names=list(kind.inputs),
                                     output_names=list(kind.outputs), dynamic_shapes=dyn, opset_version=settings.opset,
                                     optimize=True, verbose=False)
    except Exception as e:  # torch.export failures are long; keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ProjectableEdgeError(f"torch.onnx could not export the {graph} graph ({first}); "
                                   "check that the model implements exporters.protocol.ExportableModel (e.g. a "
                                   "projectable_edge SpecialisedModel)") from None
    proto = prog.model_proto
    _tidy(proto)
    _name_dims(proto, graph)
    del proto.graph.value_info[:]  # re-infer with our dim names
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    proto.producer_name = "projectable-edge"
    proto.doc_string = f"projectable-edge {graph} graph ({cfg.n_layer} layers, d_model {cfg.d_model})"
    spec = spec_from_onnx(proto, graph, cfg)
    attach_spec(proto, spec)
    onnx.checker.check_model(proto, full_check=True)
    return proto, spec


def _export_in_child(conn, parent_end, model: ExportableModel, graph: str, settings: ExportSettings) -> None:
    parent_end.close()  # else, the parent killed, its copy here keeps the pipe open and a large send blocks for ever
    try:
        proto, _ = _export_one(model, graph, settings)
        conn.send((proto.SerializeToString(), None))
    except BaseException as e:  # the parent raises it; a forked child never returns into the caller's code
        conn.send((None, str(e) if isinstance(e, ProjectableEdgeError) else
                   f"torch.onnx could not export the {graph} graph ({type(e).__name__}: {e})"))
    finally:
        conn.close()
        os._exit(0)


def _export_all(model: ExportableModel, settings: ExportSettings) -> dict[str, tuple[onnx.ModelProto, ExportSpec]]:
    """Every graph's (proto, spec). An export is seconds of single-threaded tracing, so on a Linux host with a
    core to spare, the graphs after the first are exported at the same time in forked children
    (a fork inherits the imported torch; the export is deterministic, so the files are the same)."""
    graphs = list(settings.graphs)
    # fork: Linux only, and never after CUDA started in this process (a forked child cannot use it)
    if len(graphs) < 2 or not sys.platform.startswith("linux") or (os.cpu_count() or 1) < 2 \
            or torch.cuda.is_initialized():
        return {g: _export_one(model, g, settings) for g in graphs}
    ctx, children = mp.get_context("fork"), {}
    for g in graphs[1:]:
        ours, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_export_in_child, args=(theirs, ours, model, g, settings), daemon=True)
        proc.start()
        theirs.close()
        children[g] = (proc, ours)
    try:
        start = time.perf_counter()
        out = {graphs[0]: _export_one(model, graphs[0], settings)}
        patience = max(CHILD_PATIENCE_S, CHILD_PATIENCE_X * (time.perf_counter() - start))
        for g, (proc, ours) in children.items():
            if not ours.poll(patience):  # a child stuck after the fork (a thread library that does not fork well)
                proc.kill()
                out[g] = _export_one(model, g, settings)
                continue
            try:
                data, error = ours.recv()
            except EOFError:  # it died before sending
                data, error = None, None
            proc.join()
            if data is None:
                raise ProjectableEdgeError(error or f"torch.onnx could not export the {g} graph (its export "
                                                    f"process ended with exit code {proc.exitcode})")
            proto = onnx.load_from_string(data)
            out[g] = (proto, read_spec(proto))  # the spec the child attached
        return out
    finally:
        for proc, _ in children.values():
            if proc.is_alive():
                proc.kill()


def export_onnx(model: ExportableModel, settings: ExportSettings | dict | None, out_dir: str | Path, *,
                heldout: np.ndarray | None = None, overwrite: bool = False,
                log=None) -> tuple[ExportedGraphs, dict]:
    """Export scoring.onnx + decode.onnx into out_dir and parity-check both against PyTorch, on the task's
    held-out tokens [N, T] (random tokens if None). Parity runs before anything is moved into place."""
    from projectable_edge.exporters.parity import check_parity

    settings = ExportSettings(**settings) if isinstance(settings, dict) else settings or ExportSettings()
    if not isinstance(model, ExportableModel):
        raise ProjectableEdgeError(f"export needs a model implementing exporters.protocol.ExportableModel (a "
                                   f"projectable_edge SpecialisedModel), got {type(model).__name__}; load one "
                                   "with projectable_edge.project.load_projected")
    cfg = model.cfg
    if heldout is not None:
        heldout = check_tokens(heldout, cfg.vocab_size, cfg.block_size, "held-out tokens")
    model = model.eval()
    report: dict = {"settings": settings.to_dict(), "opset": settings.opset, "exporter": "torch.onnx dynamo",
                    "torch_version": torch.__version__, "onnx_version": onnx.__version__, "graphs": {}}
    paths, specs = {}, {}
    out_dir = Path(out_dir)
    if log:
        log(f"exporting the {' and '.join(settings.graphs)} graph(s)")
    with atomic_output(out_dir, directory=True, overwrite=overwrite, what="export folder", mark=REPORT_FILE) as tmp:
        for graph, (proto, spec) in _export_all(model, settings).items():
            path = tmp / FILES[graph]
            onnx.save(proto, str(path))
            entry = {"file": FILES[graph], **file_info(path), "spec": spec.to_dict(),
                     "op_types": sorted({n.op_type for n in proto.graph.node})}
            if settings.parity:
                entry["parity"] = check_parity(path, model, heldout, precision="fp32",
                                               tolerances=settings.tolerances, log=log)
            report["graphs"][graph] = entry
            paths[graph], specs[graph] = out_dir / FILES[graph], spec
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return ExportedGraphs(out_dir, paths, specs), report
