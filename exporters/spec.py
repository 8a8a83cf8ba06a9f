"""ExportSpec: a graph's I/O contract and model facts (BOS id, cache shape), kept in the graph's metadata so a lone
.onnx file still has what parity, quantization and compilation need. The manifest's `io` field copies it."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import onnx

from projectable_edge_runtime.devices.choices import values
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.graphs.contract import SPEC_KEY, CacheLayout, GraphKind

GRAPHS = values(GraphKind)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic axis

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "dynamic_axes": {str(i): d for i, d in enumerate(self.shape) if isinstance(d, str)}}


@dataclass(frozen=True)
class ExportSpec:
    graph: str  # "scoring" | "decode"
    opset: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    vocab_size: int
    bos_id: int
    block_size: int
    n_layer: int
    n_head: int
    head_dim: int

    @property
    def kind(self) -> GraphKind:
        return GraphKind(self.graph)

    @property
    def layout(self) -> CacheLayout:
        return CacheLayout.of(self)

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs]}

    @classmethod
    def from_dict(cls, d: dict) -> "ExportSpec":
        try:
            io = {k: tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d[k])
                  for k in ("inputs", "outputs")}
            return cls(**{f.name: d[f.name] for f in fields(cls) if f.name not in io}, **io)
        except (KeyError, TypeError) as e:
            raise ProjectableEdgeError(f"export spec is missing or has a bad field ({e}); "
                                       "re-export the model") from None


def _tensor_spec(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    dims = tuple(d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim)
    return TensorSpec(vi.name, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, dims)


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def spec_from_onnx(model: onnx.ModelProto, graph: str, cfg) -> ExportSpec:
    """From the graph's declared I/O, so it cannot drift from the file; cfg: a ModelShape."""
    return ExportSpec(graph=str(graph), opset=opset_of(model),
                      inputs=tuple(_tensor_spec(v) for v in model.graph.input),
                      outputs=tuple(_tensor_spec(v) for v in model.graph.output),
                      vocab_size=cfg.vocab_size, bos_id=cfg.vocab_size, block_size=cfg.block_size,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, head_dim=cfg.head_dim)


def attach_spec(model: onnx.ModelProto, spec: ExportSpec) -> None:
    for p in list(model.metadata_props):
        if p.key == SPEC_KEY:
            model.metadata_props.remove(p)
    model.metadata_props.add(key=SPEC_KEY, value=json.dumps(spec.to_dict(), sort_keys=True))


def _io(tensors) -> list[str]:
    return [f"{t.name} {t.dtype}[{', '.join(map(str, t.shape))}]" for t in tensors]


def read_spec(model: onnx.ModelProto, where: str = "the ONNX graph") -> ExportSpec:
    """The spec a graph carries, which must still describe the graph's own inputs and outputs (a graph edited after
    export, an output renamed or an axis made static, fails here, not as a KeyError or a shape error later)."""
    for p in model.metadata_props:
        if p.key == SPEC_KEY:
            spec = ExportSpec.from_dict(json.loads(p.value))
            graph = spec_from_onnx(model, spec.graph, spec)
            has, declared = _io(graph.inputs + graph.outputs), _io(spec.inputs + spec.outputs)
            extra, lacks = [t for t in has if t not in declared], [t for t in declared if t not in has]
            if extra or lacks:
                raise ProjectableEdgeError(f"{where} was edited after export: its inputs and outputs are not those of "
                                           f"the export spec it carries (only in the graph: {'; '.join(extra) or 'none'}"
                                           f"; only in the spec: {'; '.join(lacks) or 'none'}); export the graph again")
            return spec
    raise ProjectableEdgeError(f"{where} carries no projectable-edge export spec (metadata '{SPEC_KEY}'); "
                               "use a graph written by `projectable-edge export`")
