"""TensorRT engine for a target: built with the TensorRT Python API when it is importable,
otherwise deferred to the device as a `build_engine.sh` holding the exact trtexec command.

Engines are locked to the TensorRT version and GPU that built them, so the host that
exports usually cannot build the device's engine; the script builds the same engine there
(same precision flags, DLA core, workspace and optimization profile).
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from devices import variants
from devices.errors import ProjectableEdgeError
from exporters.onnx_io import file_info, load_onnx, variant_of
from exporters.spec import read_spec
from exporters.trt_check import check_tensorrt_compat
from runtime.atomic import atomic_output
from runtime.manifest import EngineStatus

SCRIPT = "build_engine.sh"
REPORT_FILE = "compile_report.json"


@dataclass(frozen=True)
class TensorRTSettings:
    fp16: bool = True
    int8: bool = False
    dla_core: int = -1  # -1 = GPU only
    workspace_mb: int = 1024
    min_shapes: dict = field(default_factory=lambda: {"batch": 1, "seq": 1})
    opt_shapes: dict = field(default_factory=lambda: {"batch": 1, "seq": 64})
    max_shapes: dict = field(default_factory=lambda: {"batch": 32, "seq": 64})
    tensorrt_version: str | None = None  # what the device ships (profile software.tensorrt)
    target: str = "unknown"

    @classmethod
    def from_profile(cls, profile) -> "TensorRTSettings":
        """From a devices.profiles.DeviceProfile (or its to_dict()) whose backend is tensorrt."""
        d = profile.to_dict() if hasattr(profile, "to_dict") else dict(profile)
        t = d.get("tensorrt")
        if not t:
            raise ProjectableEdgeError(f"device profile {d.get('name')!r} has no [tensorrt] options; "
                                       "its compile backend is not tensorrt")
        return cls(fp16=bool(t["fp16"]), int8=bool(t["int8"]), dla_core=int(t.get("dla_core", -1)),
                   workspace_mb=int(t["workspace_mb"]), min_shapes=dict(t["min_shapes"]),
                   opt_shapes=dict(t["opt_shapes"]), max_shapes=dict(t["max_shapes"]),
                   tensorrt_version=(d.get("software") or {}).get("tensorrt"), target=d.get("name", "unknown"))

    def to_dict(self) -> dict:
        return asdict(self)


def input_shapes(spec, dims: dict, block_size: int) -> dict[str, list[int]]:
    """Concrete input shapes for one profile point {batch, seq}: the decode graph's past = seq - 1."""
    b = int(dims.get("batch", 1))
    s = min(int(dims.get("seq", block_size)), block_size)
    if spec.graph == "scoring":
        return {"tokens": [b, s]}
    cache = [spec.n_layer, b, spec.n_head, s - 1, spec.head_dim]
    return {"token": [b, 1], "past_keys": cache, "past_values": list(cache)}


def _shape_arg(shapes: dict[str, list[int]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def builder_flags(settings: TensorRTSettings, variant: variants.Variant) -> tuple[str, ...]:
    """Builder precision flags: fp16 kernels wherever the profile allows them (TensorRT picks per
    layer), plus what the variant needs and the profile enables (int8 only for a graph that carries
    its own QDQ scales: there is no calibration cache on the device)."""
    flags = ["fp16"] if settings.fp16 else []
    return tuple(flags + [f for f in variant.tensorrt_flags if f not in flags and getattr(settings, f, False)])


def trtexec_command(onnx_name: str, engine_name: str, settings: TensorRTSettings, spec,
                    variant: variants.Variant) -> list[str]:
    """The trtexec argv that builds the engine: precision, DLA, workspace and the optimization profile."""
    cmd = ["trtexec", f"--onnx={onnx_name}", f"--saveEngine={engine_name}"]
    cmd += [f"--{f}" for f in builder_flags(settings, variant)]
    if settings.dla_core >= 0:
        cmd += [f"--useDLACore={settings.dla_core}", "--allowGPUFallback"]
    cmd.append(f"--memPoolSize=workspace:{settings.workspace_mb}M")
    for flag, dims in (("min", settings.min_shapes), ("opt", settings.opt_shapes), ("max", settings.max_shapes)):
        cmd.append(f"--{flag}Shapes={_shape_arg(input_shapes(spec, dims, spec.block_size))}")
    if _version_tuple(settings.tensorrt_version) >= (8, 6):  # older trtexec only knows --buildOnly
        cmd.append("--skipInference")
    return cmd


def _version_tuple(v: str | None) -> tuple[int, ...]:
    if not v:
        return (10,)
    try:
        return tuple(int(x) for x in v.split(".")[:2])
    except ValueError:
        return (10,)


def _script(cmd: list[str], settings: TensorRTSettings, engine: str) -> str:
    expected = settings.tensorrt_version or ""
    args = " \\\n    ".join(shlex.quote(a) for a in cmd[1:])
    return f"""#!/usr/bin/env bash
# Builds {engine} for {settings.target} on the device itself: TensorRT engines are locked to the
# TensorRT version and GPU that build them. Written by projectable-edge; run it on the target.
set -euo pipefail
cd "$(dirname "$0")"
EXPECTED_TRT="{expected}"
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
if [ -n "$EXPECTED_TRT" ] && command -v python3 >/dev/null; then
  FOUND="$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null || true)"
  case "$FOUND" in
    "$EXPECTED_TRT"*) ;;
    "") echo "note: cannot read the TensorRT version from python3; expected $EXPECTED_TRT" >&2 ;;
    *) echo "warning: this device has TensorRT $FOUND but the profile expects $EXPECTED_TRT" >&2 ;;
  esac
fi
"$TRTEXEC" \\
    {args} 2>&1 | tee build_engine.log
echo "built {engine}"
"""


def _build_with_api(trt, onnx_path: Path, engine_path: Path, settings: TensorRTSettings, spec, variant, log):
    """Build and serialize the engine with the TensorRT Python API (same settings as the script)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ProjectableEdgeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    for flag in builder_flags(settings, variant):
        config.set_flag(getattr(trt.BuilderFlag, flag.upper()))
    if settings.dla_core >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    profile = builder.create_optimization_profile()
    lo, opt, hi = (input_shapes(spec, d, spec.block_size)
                   for d in (settings.min_shapes, settings.opt_shapes, settings.max_shapes))
    for name in lo:
        profile.set_shape(name, lo[name], opt[name], hi[name])
    config.add_optimization_profile(profile)
    if log:
        log(f"building TensorRT {trt.__version__} engine for {onnx_path.name} (this can take minutes)")
    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise ProjectableEdgeError(f"TensorRT failed to build an engine from {onnx_path.name}; see the log above")
    engine_path.write_bytes(bytes(blob))
    return time.perf_counter() - start


def _plan(src: Path, settings: TensorRTSettings) -> tuple[dict, list[str], object, variants.Variant]:
    """Check the graph and write down how its engine is built: (report so far, trtexec argv, spec, variant)."""
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
    cmd = trtexec_command(src.name, engine, settings, spec, variant)
    flags = builder_flags(settings, variant)
    report = {"backend": "tensorrt", "target": settings.target, "settings": settings.to_dict(), "onnx": src.name,
              "variant": variant.name, "engine": engine, "script": SCRIPT, "command": cmd,
              "command_line": shlex.join(cmd),
              "flags": {"fp16": "fp16" in flags, "int8": "int8" in flags, "dla_core": settings.dla_core,
                        "workspace_mb": settings.workspace_mb},
              "shapes": {k: input_shapes(spec, d, spec.block_size) for k, d in
                         (("min", settings.min_shapes), ("opt", settings.opt_shapes), ("max", settings.max_shapes))},
              "tensorrt_version_expected": settings.tensorrt_version, "trt_check": check}
    if settings.dla_core >= 0 and settings.min_shapes != settings.max_shapes:
        report["warning"] = ("DLA runs static shapes only: with dynamic min/max shapes TensorRT places these "
                             "layers on the GPU (--allowGPUFallback); set min = opt = max shapes to use the DLA")
    if settings.int8 and "int8" not in flags:
        report["note"] = ("profile enables int8 but this graph has no QDQ nodes: built without --int8 "
                          "(quantize with int8-static first for an int8 engine)")
    return report, cmd, spec, variant


def _build(tmp: Path, src: Path, settings: TensorRTSettings, spec, variant, report: dict, log) -> None:
    """Build the engine here when TensorRT can; otherwise record why it is deferred to the device."""
    try:
        import tensorrt as trt
    except ImportError:  # the usual case on an x86 host without NVIDIA's wheels
        report.update(status=str(EngineStatus.DEFERRED), tensorrt_version_host=None, build_seconds=None,
                      reason="tensorrt is not importable on this host; run build_engine.sh on the device")
        if log:
            log(f"TensorRT not available here: wrote {SCRIPT} to build {report['engine']} on {settings.target}")
        return
    engine = tmp / report["engine"]
    try:
        secs = _build_with_api(trt, tmp / src.name, engine, settings, spec, variant, log)
    except Exception as e:  # tensorrt imports but cannot build here (no usable GPU, driver, ...)
        engine.unlink(missing_ok=True)
        report.update(status=str(EngineStatus.DEFERRED), tensorrt_version_host=trt.__version__, build_seconds=None,
                      reason=f"TensorRT {trt.__version__} could not build here ({type(e).__name__}: {e}); "
                             f"run {SCRIPT} on the device")
        if log:
            log(report["reason"])
        return
    report.update(status=str(EngineStatus.BUILT), tensorrt_version_host=trt.__version__, build_seconds=secs,
                  reason="built with the TensorRT Python API on this host")
    expected = settings.tensorrt_version
    if expected and not trt.__version__.startswith(expected):
        report["version_warning"] = (f"built with TensorRT {trt.__version__} but {settings.target} ships "
                                     f"{expected}: the engine will not load there; run {SCRIPT} on the device instead")


def compile_tensorrt(onnx_path: str | Path, settings: TensorRTSettings | dict, out_dir: str | Path, *,
                     overwrite: bool = False, log=None) -> tuple[Path, dict]:
    """Write out_dir/{<graph>.onnx, build_engine.sh, <graph>.plan if built, compile_report.json}.

    Report keys: backend, status ('built' | 'deferred'), reason, target, onnx, variant, engine, script,
    command (argv), command_line, flags, shapes{min,opt,max}, tensorrt_version_expected,
    tensorrt_version_host, build_seconds, trt_check, files{name: {sha256, bytes}}.
    """
    if isinstance(settings, dict):
        settings = TensorRTSettings(**settings)
    src, out_dir = Path(onnx_path), Path(out_dir)
    report, cmd, spec, variant = _plan(src, settings)
    with atomic_output(out_dir, directory=True, overwrite=overwrite) as tmp:
        shutil.copyfile(src, tmp / src.name)
        script = tmp / SCRIPT
        script.write_text(_script(cmd, settings, report["engine"]))
        script.chmod(0o755)
        _build(tmp, src, settings, spec, variant, report, log)
        report["files"] = {p.name: file_info(p) for p in sorted(tmp.iterdir())}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    built = report["status"] == EngineStatus.BUILT
    return (out_dir / report["engine"] if built else out_dir / SCRIPT), report
