"""What `generate` will build, decided before anything is read or written: settings, target, variants."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from projectable_edge_runtime.devices import variants
from projectable_edge_runtime.devices.choices import CompileBackend
from projectable_edge_runtime.devices.errors import ProjectableEdgeError
from projectable_edge_runtime.devices.profiles import DEFAULT_TARGET, DeviceProfile, load_profile

AUTO = "auto"


def precision_choices() -> tuple[str, ...]:
    """What `generate --precision` accepts: auto (the profile's order) or a profile's word for a variant."""
    return (AUTO, *variants.profile_precisions())


@dataclass(frozen=True)
class GenerateSettings:
    task: str
    target: str = DEFAULT_TARGET
    source: str = "runs/digits"
    precision: str = AUTO  # auto = every precision the profile lists, select the first that passes
    out: str | None = None  # default bundles/<task>__<target>
    overwrite: bool = False
    goldens: int = 64  # held-out sequences shipped for on-device validation
    bench_runs: int = 50  # host latency runs per candidate (after warm-up)
    samples: int = 16
    cache_dir: str | None = None  # step cache (default: .cache beside the bundle folder)
    cache: bool = True  # reuse export/quantization outputs of identical inputs and settings
    sign_key: str | None = None  # Ed25519 private key (PEM) that signs the manifest digest
    ladder: bool = False  # every (size, precision) of the run's size ladder in one bundle
    references: bool = False  # also the source, universal and scratch rows (builds the run's baseline roles)

    def __post_init__(self) -> None:
        """Checked when made (the Python API's arguments), not as a TypeError or a traceback mid-build."""
        def bad(name: str, want: str):
            return ProjectableEdgeError(f"generate option '{name}' must be {want}, got {getattr(self, name)!r}")

        paths = (str, os.PathLike)
        if isinstance(self.task, bool) or not isinstance(self.task, (str, int)):
            raise bad("task", "a task name or index")
        for name, want in (("target", "a device profile name or .toml path"), ("source", "a run folder")):
            if not isinstance(getattr(self, name), paths):
                raise bad(name, want)
        for name in ("out", "cache_dir", "sign_key"):
            if not isinstance(getattr(self, name), (*paths, type(None))):
                raise bad(name, "a path or None")
        for name, least in (("goldens", 1), ("bench_runs", 1), ("samples", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < least:
                raise bad(name, f"a whole number >= {least}")
        for name in ("overwrite", "cache", "ladder", "references"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")

    def resolved(self) -> "GenerateSettings":
        """Every path absolute, fixed before any work: nothing depends on the cwd later."""
        from projectable_edge.data import not_utf8

        if self.cache_dir is not None and not self.cache:
            raise ProjectableEdgeError("--cache-dir and --no-cache contradict each other (cache_dir with cache=False "
                                       "in Python): pass one of them")

        def ab(p: str | None) -> str | None:
            path = None if p is None else str(Path(p).expanduser().resolve())
            if path is not None and not_utf8(path):
                raise ProjectableEdgeError(f"path {os.fsencode(path)!r} is not UTF-8 text (the manifest records it, "
                                           "and onnxruntime opens graphs by it): rename it, or pass a link to it "
                                           "whose path is UTF-8")
            return path

        return replace(self, source=ab(self.source), out=ab(self.out), cache_dir=ab(self.cache_dir),
                       sign_key=ab(self.sign_key))


@dataclass(frozen=True)
class Plan:
    settings: GenerateSettings
    profile: DeviceProfile
    variants: tuple[str, ...]  # registry names to build, in the order they are preferred for the target

    @property
    def built(self) -> tuple[str, ...]:
        """Every variant built, preferred first; fp32 always (every other variant is converted from it)."""
        return tuple(dict.fromkeys((*self.variants, variants.FP32.name)))


def make_plan(settings: GenerateSettings) -> Plan:
    """Which variants to build, preferred first; fails on a bad target, precision or signing key before any read."""
    profile, precision = load_profile(settings.target), settings.precision
    if settings.sign_key is not None:
        from projectable_edge_runtime.bundle.signing import load_private_key

        load_private_key(settings.sign_key)
    if precision not in precision_choices():
        raise ProjectableEdgeError(f"unknown precision '{precision}': choose one of {', '.join(precision_choices())}")
    names = [variants.get(p).name for p in (profile.precisions if precision == AUTO else (precision,))]
    unbuildable = [n for n in names if not variants.get(n).tensorrt_buildable]
    if profile.compile_backend == CompileBackend.TENSORRT and unbuildable:
        raise ProjectableEdgeError(f"TensorRT cannot build {', '.join(unbuildable)} for {profile.name}; "
                                   "pick another precision")
    trt = profile.tensorrt
    off = [f for n in names for f in variants.get(n).tensorrt_flags if trt and not getattr(trt, f)]
    if off:  # the profile's own check of its precisions, for --precision
        raise ProjectableEdgeError(f"--precision {precision}: {profile.source_file or profile.name} sets tensorrt."
                                   f"{off[0]} = false (the device cannot run it); enable it there or pick another "
                                   "precision")
    if profile.compile_backend == CompileBackend.TENSORRT:  # an older parser refuses every graph, so say it now
        from projectable_edge.exporters.onnx_export import ExportSettings
        from projectable_edge.exporters.trt_check import opset_range

        version, opset = profile.software["tensorrt"], ExportSettings().opset
        lo, hi = opset_range(version)
        if not lo <= opset <= hi:
            raise ProjectableEdgeError(
                f"{profile.name} records TensorRT {version}, whose ONNX parser reads opsets {lo}..{hi}, but generate "
                f"exports opset {opset}: the device needs TensorRT 9 or newer (JetPack 6 ships 10.3); if it has "
                f"that, set software.tensorrt in {profile.source_file or 'its profile'} to it, else target it with "
                "compile_backend = \"onnxruntime\"")
    return Plan(settings, profile, tuple(names))
