"""TensorRT engine for a target: built with the TensorRT Python API when it is importable, else left to the
device as `build_engine.sh` with the exact trtexec command (engines are locked to the TensorRT version and GPU
that built them, so the exporting host usually cannot build the device's engine)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge.exporters.onnx_io import load_onnx, variant_of
from projectable_edge.exporters.spec import read_spec
from projectable_edge.exporters.trt_check import check_tensorrt_compat
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.bundle.requirements import parse_version
from projectable_edge_runtime.bundle.manifest import EngineStatus, file_info

SCRIPT = "build_engine.sh"
REPORT_FILE = "compile_report.json"


@dataclass(frozen=True)
class TensorRTSettings:
    fp16: bool = True
    int8: bool = False
    dla_core: int = -1  # -1 = GPU only
    workspace_mb: int = 1024
    # batch limits of the optimization profile (the profile's); sequence and cache lengths come from
    # the graph's block size (profile_shapes), never from here
    min_shapes: dict = field(default_factory=lambda: {"batch": 1})
    opt_shapes: dict = field(default_factory=lambda: {"batch": 1})
    max_shapes: dict = field(default_factory=lambda: {"batch": 32})
    tensorrt_version: str | None = None  # what the device ships (profile software.tensorrt)
    target: str = "unknown"

    @classmethod
    def from_profile(cls, profile) -> "TensorRTSettings":
        t = profile.tensorrt
        if t is None:
            raise ProjectableEdgeError(f"device profile {profile.name!r} has no [tensorrt] options; "
                                       "its compile backend is not tensorrt")
        return cls(fp16=t.fp16, int8=t.int8, dla_core=t.dla_core, workspace_mb=t.workspace_mb,
                   min_shapes=dict(t.min_shapes), opt_shapes=dict(t.opt_shapes), max_shapes=dict(t.max_shapes),
                   tensorrt_version=profile.software.get("tensorrt"), target=profile.name)


def profile_shapes(spec, settings: TensorRTSettings) -> dict[str, dict[str, list[int]]]:
    """{min, opt, max: {input: shape}} of the optimization profile, batch from the profile: scoring takes 1 ..
    block_size tokens (opt: a full image); decode a past of 0 .. block_size - 1 (opt: half the image)."""
    t = int(spec.block_size)
    names = [i.name for i in spec.inputs]
    out = {}
    for point, dims, tokens, past in (("min", settings.min_shapes, 1, 0), ("opt", settings.opt_shapes, t, t // 2),
                                      ("max", settings.max_shapes, t, t - 1)):
        b = int(dims.get("batch", 1))
        cache = [spec.n_layer, b, spec.n_head, past, spec.head_dim]
        shapes = ({"tokens": [b, tokens]} if spec.graph == "scoring" else
                  {"token": [b, 1], "past_keys": cache, "past_values": list(cache)})
        if set(names) != set(shapes):
            raise ProjectableEdgeError(f"{spec.graph} graph inputs {names} are not the contract's {sorted(shapes)}; "
                                       "re-export the graph with `projectable-edge export`")
        out[point] = {n: shapes[n] for n in names}
    return out


def strongly_typed(settings: TensorRTSettings, variant: variants.Variant) -> bool:
    """NVIDIA's guidance for explicitly quantized (QDQ) graphs: strongly typed (TensorRT 10.0+), no precision flags
    (weakly-typed --fp16/--int8 on QDQ graphs is deprecated from 10.12 and removed in 11)."""
    return variant.qdq and _version_tuple(settings.tensorrt_version) >= (10, 0)


def builder_flags(settings: TensorRTSettings, variant: variants.Variant) -> tuple[str, ...]:
    """No flags when strongly typed (the graph's types rule); else fp16 where the profile allows it, plus what the
    variant needs and the profile enables (int8 only with the graph's own QDQ scales: no calibration cache)."""
    if strongly_typed(settings, variant):
        return ()
    flags = ["fp16"] if settings.fp16 else []
    return tuple(flags + [f for f in variant.tensorrt_flags if f not in flags and getattr(settings, f, False)])


def trtexec_command(onnx_name: str, engine_name: str, settings: TensorRTSettings, spec,
                    variant: variants.Variant) -> list[str]:
    cmd = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    if strongly_typed(settings, variant):
        cmd.append("--stronglyTyped")
    cmd += [f"--{f}" for f in builder_flags(settings, variant)]
    if settings.dla_core >= 0:
        cmd += [f"--useDLACore={settings.dla_core}", "--allowGPUFallback"]
    cmd.append(f"--memPoolSize=workspace:{settings.workspace_mb}M")
    for point, shapes in profile_shapes(spec, settings).items():
        cmd.append(f"--{point}Shapes=" + ",".join(f"{n}:{'x'.join(map(str, dims))}" for n, dims in shapes.items()))
    # the test inference runs after the build, on the bundle's goldens (engine_record), not on
    # trtexec's random tokens, which may fall outside the vocabulary
    cmd.append("--skipInference" if _version_tuple(settings.tensorrt_version) >= (8, 6) else "--buildOnly")
    return cmd


def _version_tuple(v: str | None) -> tuple[int, ...]:
    """(major, minor) of a TensorRT version; 10 when unknown."""
    return parse_version(v)[:2] if v and v[0].isdigit() else (10, 0)


def _script(cmd: list[str], settings: TensorRTSettings, engine: str) -> str:
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    return f"""#!/usr/bin/env bash
# Builds {engine} for {settings.target} on the device itself: TensorRT engines are locked to the
# TensorRT version and GPU that build them. Written by projectable-edge; run it on the target.
set -euo pipefail
cd "$(dirname "$0")"
EXPECTED_TRT="{settings.tensorrt_version or ''}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if ! command -v -- "${{TRTEXEC}}" >/dev/null; then
  echo "error: trtexec not found (${{TRTEXEC}}): install TensorRT (JetPack ships it) or set TRTEXEC=/path/to/trtexec; nothing was built" >&2
  exit 1
fi
if [ -n "$EXPECTED_TRT" ] && command -v python3 >/dev/null; then
  FOUND="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
  case "$FOUND" in
    "$EXPECTED_TRT"*) ;;
    "") echo "note: cannot read the TensorRT version from python3; expected $EXPECTED_TRT" >&2 ;;
    *) echo "note: this device has TensorRT $FOUND (the profile says $EXPECTED_TRT); the engine record keeps $FOUND" >&2 ;;
  esac
fi
"$TRTEXEC" \\
    {args} 2>&1 | tee build_engine.log || {{
  status=$?
  rm -f {shlex.quote(engine)} build_engine.log  # a failed build leaves the bundle as it was (the loader refuses unlisted files)
  echo "error: trtexec failed (exit $status; its output is above): {engine} was not built" >&2
  exit "$status"
}}
echo "built {engine}"
"""


def _build(tmp: Path, src: Path, settings: TensorRTSettings, spec, variant, report: dict, log) -> None:
    """Build the engine here when TensorRT can; otherwise record why it is deferred to the device."""
    report.update(status=str(EngineStatus.DEFERRED), tensorrt_version_host=None, build_seconds=None)
    try:
        import tensorrt as trt
    except ImportError:  # the usual case on an x86 host without NVIDIA's wheels
        report["reason"] = "tensorrt is not importable on this host; run build_engine.sh on the device"
        log(f"TensorRT not available here: wrote {SCRIPT} to build {report['engine']} on {settings.target}")
        return
    engine, report["tensorrt_version_host"] = tmp / report["engine"], trt.__version__
    try:  # the same engine as the script's
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        if strongly_typed(settings, variant) and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(src)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ProjectableEdgeError(f"TensorRT cannot parse {src.name}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
        for flag in builder_flags(settings, variant):
            config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
        if settings.dla_core >= 0:
            config.default_device_type = trt.DeviceType.DLA
            config.DLA_core = settings.dla_core
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
        profile = builder.create_optimization_profile()
        pts = profile_shapes(spec, settings)
        for name in pts["min"]:
            profile.set_shape(name, pts["min"][name], pts["opt"][name], pts["max"][name])
        config.add_optimization_profile(profile)
        log(f"building TensorRT {trt.__version__} engine for {src.name} (this can take minutes)")
        start = time.perf_counter()
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise ProjectableEdgeError(f"TensorRT failed to build an engine from {src.name}; see the log above")
        engine.write_bytes(bytes(blob))
        secs = time.perf_counter() - start
    except Exception as e:  # tensorrt imports but cannot build here (no usable GPU, driver, ...)
        engine.unlink(missing_ok=True)
        report["reason"] = (f"TensorRT {trt.__version__} could not build here ({type(e).__name__}: {e}); "
                            f"run {SCRIPT} on the device")
        log(report["reason"])
        return
    report.update(status=str(EngineStatus.BUILT), build_seconds=secs,
                  reason="built with the TensorRT Python API on this host")
    expected = settings.tensorrt_version
    if expected and not trt.__version__.startswith(expected):
        report["version_warning"] = (f"built with TensorRT {trt.__version__} but {settings.target} ships "
                                     f"{expected}: the engine will not load there; run {SCRIPT} on the device instead")


def compile_tensorrt(onnx_path: str | Path, settings: TensorRTSettings | dict, out_dir: str | Path, *,
                     overwrite: bool = False, log=None, copy_onnx: bool = True) -> tuple[Path, dict]:
    """Write out_dir/{build_engine.sh, <graph>.plan if built, compile_report.json} (+ <graph>.onnx with
    copy_onnx; without it the script reads the graph where it is, by its path relative to out_dir)."""
    if isinstance(settings, dict):
        settings = TensorRTSettings(**settings)
    src, out_dir = Path(onnx_path), Path(out_dir)
    proto = load_onnx(src)
    spec = read_spec(proto, str(src))
    check = check_tensorrt_compat(proto, settings.tensorrt_version)
    if not check["ok"]:
        errs = "; ".join(f"{p['node'] or 'graph'}: {p['message']}"
                         for p in check["problems"] if p["severity"] == "error")
        raise ProjectableEdgeError(f"{src} will not build with TensorRT {check['tensorrt_version']}: {errs}. "
                                   "Use the fp32/fp16 graph or int8-static (QDQ) for TensorRT targets")
    variant = variants.get(variant_of(proto))
    engine = src.with_suffix(".plan").name
    onnx_arg = src.name if copy_onnx else os.path.relpath(src.resolve(), out_dir.resolve())
    cmd = trtexec_command(onnx_arg, engine, settings, spec, variant)
    flags = builder_flags(settings, variant)
    report = {"backend": "tensorrt", "target": settings.target, "settings": asdict(settings), "onnx": src.name,
              "variant": variant.name, "engine": engine, "script": SCRIPT, "command": cmd,
              "command_line": shlex.join(cmd),
              "flags": {"fp16": "fp16" in flags, "int8": "int8" in flags, "dla_core": settings.dla_core,
                        "workspace_mb": settings.workspace_mb},
              "shapes": profile_shapes(spec, settings), "block_size": spec.block_size,
              "typing": "strong" if strongly_typed(settings, variant) else "weak",
              "tensorrt_version_expected": settings.tensorrt_version, "trt_check": check}
    if settings.dla_core >= 0:
        report["warning"] = ("DLA runs static shapes only: with dynamic min/max shapes TensorRT places these "
                             "layers on the GPU (--allowGPUFallback); set min = opt = max shapes to use the DLA")
    if settings.int8 and "int8" not in flags:
        report["note"] = ("profile enables int8 but this graph has no QDQ nodes: built without --int8 "
                          "(quantize with int8-static first for an int8 engine)")
    with atomic_output(out_dir, directory=True, overwrite=overwrite, what="compile folder", mark=REPORT_FILE) as tmp:
        if copy_onnx:
            shutil.copyfile(src, tmp / src.name)
        script = tmp / SCRIPT
        script.write_text(_script(cmd, settings, report["engine"]))
        script.chmod(0o755)
        _build(tmp, src, settings, spec, variant, report, log or (lambda s: None))
        report["files"] = {p.name: file_info(p) for p in sorted(tmp.iterdir())}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    built = report["status"] == EngineStatus.BUILT
    return (out_dir / report["engine"] if built else out_dir / SCRIPT), report
