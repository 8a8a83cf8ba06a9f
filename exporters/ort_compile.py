"""ONNX Runtime "compilation": an offline-optimized graph and the ORT format for minimal builds.

Optimizing once at build time saves session start-up on the device; the `.ort` flatbuffer
is what ONNX Runtime mobile / minimal builds load (they cannot read .onnx), and the
required-operators config lets such a build include only the kernels this model uses.
Level 'basic' is hardware-independent (portable to any provider); 'extended'/'all' may
insert CPU-provider contrib ops, so they fit only a full build running on the same provider.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from projectable_edge_runtime.devices.choices import choose
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.onnx_io import file_info, load_onnx
from projectable_edge.exporters.spec import read_spec
from projectable_edge_runtime.atomic import atomic_output
from projectable_edge_runtime.runners import OptLevel, OrtRunner, ort_session

REPORT_FILE = "compile_report.json"


@dataclass(frozen=True)
class OrtCompileSettings:
    optimized_level: str = "extended"  # the offline-optimized .onnx for full ONNX Runtime builds
    ort_format_level: str = "basic"  # the .ort for minimal / mobile builds: portable by default
    target: str = "x86-64-cpu"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)

    def __post_init__(self):
        for k in ("optimized_level", "ort_format_level"):
            level = choose(OptLevel, getattr(self, k), f"ONNX Runtime {k}")
            if level is OptLevel.DISABLE:
                raise ProjectableEdgeError(f"{k} 'disable' writes an unoptimized graph; choose basic, extended or all")
            object.__setattr__(self, k, level)

    @classmethod
    def from_profile(cls, profile) -> "OrtCompileSettings":
        d = profile.to_dict() if hasattr(profile, "to_dict") else dict(profile)
        return cls(target=d.get("name", "unknown"),
                   execution_providers=tuple(d.get("execution_providers") or ("CPUExecutionProvider",)))

    def to_dict(self) -> dict:
        return {**asdict(self), "optimized_level": str(self.optimized_level),
                "ort_format_level": str(self.ort_format_level), "execution_providers": list(self.execution_providers)}


def _save_optimized(src: Path, dst: Path, level: str, ort_format: bool) -> None:
    ort_session(src, optimization=level, save_optimized=dst, ort_format=ort_format)


def _smoke(path: Path, reference: Path, spec) -> float:
    """Max abs logits difference of a compiled file vs its source on a fixed input (must load and agree)."""
    rng = np.random.default_rng(0)
    if spec.graph == "scoring":
        feed = {"tokens": rng.integers(0, spec.vocab_size, (2, spec.block_size)).astype(np.int64)}
    else:
        cache = rng.standard_normal((spec.n_layer, 2, spec.n_head, 3, spec.head_dim)).astype(np.float32)
        feed = {"token": np.array([[spec.bos_id], [1]], np.int64), "past_keys": cache, "past_values": cache * 0.5}
    got = OrtRunner(path, threads=1, optimization="disable").run(feed)["logits"]
    ref = OrtRunner(reference, threads=1).run(feed)["logits"]
    return float(np.abs(got - ref).max())


def compile_onnxruntime(onnx_path: str | Path, settings: OrtCompileSettings | dict | None, out_dir: str | Path, *,
                        overwrite: bool = False, log=None) -> tuple[Path, dict]:
    """Write out_dir/{<stem>.optimized.onnx, <stem>.ort, <stem>.required_operators.config, compile_report.json}.

    Report keys: backend, status ('built'), target, settings, optimized_onnx, ort_format,
    required_operators, levels, max_abs_diff {optimized_onnx, ort_format}, op_types, files.
    """
    if isinstance(settings, dict):
        settings = OrtCompileSettings(**settings)
    settings = settings or OrtCompileSettings()
    src = Path(onnx_path)
    proto = load_onnx(src)
    spec = read_spec(proto, str(src))
    stem = src.stem
    names = {"optimized_onnx": f"{stem}.optimized.onnx", "ort_format": f"{stem}.ort",
             "required_operators": f"{stem}.required_operators.config"}
    out_dir = Path(out_dir)
    with atomic_output(out_dir, directory=True, overwrite=overwrite) as tmp:
        if log:
            log(f"optimizing {src.name} for ONNX Runtime ({settings.optimized_level}) and writing the ORT format "
                f"({settings.ort_format_level})")
        _save_optimized(src, tmp / names["optimized_onnx"], settings.optimized_level, ort_format=False)
        _save_optimized(src, tmp / names["ort_format"], settings.ort_format_level, ort_format=True)
        from onnxruntime.tools.ort_format_model import create_config_from_models

        cfg_path = tmp / names["required_operators"]
        logging.getLogger("ort_format_model.utils").setLevel(logging.WARNING)
        create_config_from_models([tmp / names["ort_format"]], cfg_path, enable_type_reduction=False)
        # the tool records the (temporary) model path; point it at the shipped file name instead
        cfg_path.write_text(cfg_path.read_text().replace(str(tmp / names["ort_format"]), names["ort_format"]))
        diffs = {k: _smoke(tmp / names[k], src, spec) for k in ("optimized_onnx", "ort_format")}
        bad = {k: v for k, v in diffs.items() if not v <= 1e-4}
        if bad:
            raise ProjectableEdgeError(f"ONNX Runtime's optimized graphs of {src.name} disagree with it ({bad}); "
                                       "use optimized_level='basic'")
        opt = onnx.load(str(tmp / names["optimized_onnx"]))
        report = {"backend": "onnxruntime", "status": "built", "target": settings.target,
                  "settings": settings.to_dict(), **names,
                  "levels": {"optimized_onnx": str(settings.optimized_level),
                             "ort_format": str(settings.ort_format_level)},
                  "max_abs_diff": diffs, "op_types": sorted({f"{n.domain + '::' if n.domain else ''}{n.op_type}"
                                                             for n in opt.graph.node}),
                  "onnxruntime_version": __import__("onnxruntime").__version__}
        report["files"] = {p.name: file_info(p) for p in sorted(tmp.iterdir())}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return out_dir / names["ort_format"], report
