"""CLI for power users: `export`, `quantize` and `compile`, one step of the bundle pipeline each.

Each prints a short summary (or the step's full JSON report with --json) and refuses to
overwrite an existing output unless --overwrite is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from projectable_edge_runtime.devices.variants import converted
from projectable_edge.cli_common import choice_enum, emit_json, err, out

QuantizePrecision = choice_enum("QuantizePrecision", converted())


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: err.print(s, highlight=False))


def export(
    projected: Path = typer.Argument(..., help="Projected model stem (STEM.safetensors + STEM.json from `project`).", resolve_path=True),
    out_dir: Path = typer.Option(..., "--out", help="Folder to create: scoring.onnx, decode.onnx, export_report.json.", resolve_path=True),
    heldout: Optional[Path] = typer.Option(None, help="Held-out task tokens (.npy, int [N, T]) for parity, bits/dim.", resolve_path=True),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the export report as JSON."),
):
    """Export a projected model to ONNX (scoring + KV-cache decode graphs) and check parity with PyTorch."""
    from projectable_edge.exporters.onnx_export import export_onnx
    from projectable_edge.exporters.onnx_io import load_tokens_npy
    from projectable_edge.project import load_projected

    model, _ = load_projected(projected)
    tokens = load_tokens_npy(heldout, "held-out tokens") if heldout else None
    art, report = export_onnx(model, None, out_dir, heldout=tokens, overwrite=overwrite, log=_log(as_json))
    if as_json:
        emit_json({"out": str(art.dir), **report})
    else:
        for g, e in report["graphs"].items():
            b = e["parity"]["bits_per_dim"]
            out.print(f"{art.dir / e['file']}: parity ok, bits/dim {b['onnx']:.4f} (PyTorch {b['pytorch']:.4f})")


def quantize(
    onnx_path: Path = typer.Argument(..., metavar="ONNX", help="An fp32 graph written by `export`.", resolve_path=True),
    precision: QuantizePrecision = typer.Option(..., help="A converted variant of the registry."),
    out_path: Path = typer.Option(..., "--out", help="Output .onnx file.", resolve_path=True),
    calibration: Optional[Path] = typer.Option(None, help="Training tokens (.npy, int [N, T]) for int8-static.", resolve_path=True),
    heldout: Optional[Path] = typer.Option(None, help="Held-out tokens (.npy) to validate bits/dim on.", resolve_path=True),
    report_only: bool = typer.Option(False, help="Write the variant even if it breaks its accuracy budget."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the quantization report as JSON."),
):
    """Quantize an exported graph (FP16, INT8 dynamic, INT8 static QDQ) and validate it on task tokens."""
    from projectable_edge.exporters.onnx_io import load_tokens_npy
    from projectable_edge.exporters.quantize import QuantizeSettings
    from projectable_edge.exporters.quantize import quantize as run_quantize

    settings = QuantizeSettings(precision=str(precision), on_budget_fail="report" if report_only else "raise")
    calib = load_tokens_npy(calibration, "calibration tokens") if calibration else None
    held = load_tokens_npy(heldout, "held-out tokens") if heldout else None
    path, report = run_quantize(onnx_path, settings, out_path, calibration=calib, heldout=held,
                                overwrite=overwrite, log=_log(as_json))
    if as_json:
        emit_json(report)
    else:
        fl = report["float_layers"]
        floats = fl.get("float_matmuls") or fl.get("fp32_nodes") or []
        out.print(f"{path}: {report['line']}; left in float: {', '.join(floats) or 'none'}")


def compile(  # noqa: A001 - the subcommand is called `compile`
    onnx_path: Path = typer.Argument(..., metavar="ONNX", help="A graph written by `export` or `quantize`.", resolve_path=True),
    target: str = typer.Option(..., help="Device profile name, alias or .toml path (e.g. jetson, x86-64-cpu)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder to create.", resolve_path=True),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the compile report as JSON."),
):
    """Compile a graph for a target: a TensorRT engine (or build_engine.sh) or ONNX Runtime's formats."""
    from projectable_edge.exporters.compile import compile_for_target

    artifact, report = compile_for_target(onnx_path, target, out_dir, overwrite=overwrite, log=_log(as_json))
    if as_json:
        emit_json({"artifact": str(artifact), **report})
    elif report["status"] == "deferred":
        out.print(f"{artifact}: TensorRT is not on this host; run it on {report['target']}:\n  "
                  f"{report['command_line']}")
    else:
        out.print(f"{out_dir}: {report['backend']} artifacts built for {report['target']}: "
                  f"{', '.join(report['files'])}")
