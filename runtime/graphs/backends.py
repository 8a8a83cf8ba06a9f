"""Which runner executes a bundle's graphs, and why: a TensorRT engine when usable, else ONNX Runtime.
The report says why, so a silent CPU fallback never passes for a TensorRT run."""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..devices.choices import StrEnum, choose
from ..devices.errors import ProjectableEdgeError
from .contract import GraphKind, check_io
from .hardware import execution_report, tensorrt_version
from ..bundle.manifest import Engine, EngineStatus, Graphs
from .runners import OrtRunner, ort


MAX_THREADS = 4096  # onnxruntime's intra-op count is a C int, and a pool this large is already a mistake


class Backend(StrEnum):
    AUTO = "auto"
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


def choose_engine(bundle_dir: Path, engine: Engine | None, variant: str, backend: Backend,
                  records: dict[str, dict[str, Any]] | None = None) -> tuple[Path | None, str]:
    """(engine path to use or None, why); ORT is the fallback. A device-built engine's record (hash-checked by the
    loader) names the TensorRT that built it, not the profile. build_engine.sh runs from anywhere (it cds)."""
    rebuild = f"bash {bundle_dir.resolve() / 'build_engine.sh'}"
    if backend is Backend.ONNXRUNTIME:
        return None, "onnxruntime backend requested"
    if engine is None:
        return None, "a ladder size: no TensorRT engine is built for it; it runs on ONNX Runtime"
    if engine.status == EngineStatus.NOT_APPLICABLE:
        return None, "the target compiles with onnxruntime; the bundle has no TensorRT engine"
    if engine.variant and engine.variant != variant:
        return None, (f"the TensorRT engine was built from variant '{engine.variant}', "
                      f"but variant '{variant}' was requested")
    if not engine.path or not (bundle_dir / engine.path).is_file():
        return None, f"TensorRT engine not built yet ({engine.status}); build it on the device with `{rebuild}`"
    record = (records or {}).get(engine.path)
    if engine.status == EngineStatus.DEFERRED and record is None:
        return None, f"the TensorRT engine has no build record; rebuild it with `{rebuild}`"
    test = (record or {}).get("test_inference") or {}
    if record is not None and test.get("passed") is not True:
        return None, (f"the device build's test inference did not pass ({test.get('reason', 'not run')}); "
                      f"rebuild with `{rebuild}`")
    version, why = tensorrt_version()
    if version is None:
        return None, why
    built = record["tensorrt_version"] if record is not None else engine.tensorrt_version
    if built and str(built).split(".")[:2] != version.split(".")[:2]:
        return None, (f"the engine was built with TensorRT {built} but this device has {version}; engines "
                      f"are locked to the TensorRT version — rebuild with `{rebuild}`")
    origin = f"built on {record.get('device', 'the device')}" if record is not None else "built on the host"
    return bundle_dir / engine.path, f"TensorRT {version} engine '{engine.path}' ({origin} with TensorRT {built})"


# where generate's ONNX Runtime compile step writes the selected variant's compiled decode graph
COMPILED_DECODE = "ort_decode/decode.optimized.onnx"


def compiled_decode(bundle_dir: Path, engine: Engine | None, variant: str, providers) -> tuple[str | None, str]:
    """(the compiled decode graph to run instead of the variant's own, or None; why): the same tokens with under
    half the kernels (contrib kernels, one cache per layer; README's decode section)."""
    if engine is None or engine.status != EngineStatus.NOT_APPLICABLE or engine.variant != variant:
        return None, "no ONNX Runtime compile of this candidate in the bundle"
    if COMPILED_DECODE.rsplit("/", 1)[1] not in ((engine.ort or {}).get("decode") or {}):
        return None, "the bundle's ONNX Runtime compile has no decode graph"
    if any(p != "CPUExecutionProvider" for p in providers):
        return None, "the compiled decode graph is for the CPU provider; other providers run the variant's own"
    if not (bundle_dir / COMPILED_DECODE).is_file():
        return None, f"'{COMPILED_DECODE}' is missing"
    return COMPILED_DECODE, "the ONNX Runtime compile of the candidate's decode graph"


def make_runners(bundle_dir: Path, graphs: Graphs, variant: str, engine: Engine | None, profile,
                 providers=None, backend: str = "auto", threads: int | None = None, records=None):
    """((score runner, decode runner or None), report dict) for one candidate's graphs."""
    backend = choose(Backend, backend, "backend")
    if providers is not None and (not isinstance(providers, (list, tuple))
                                  or not all(isinstance(p, str) for p in providers)):
        raise ProjectableEdgeError(f"providers must be a list of onnxruntime execution provider names, e.g. "
                                   f"['CUDAExecutionProvider', 'CPUExecutionProvider'], got {providers!r}")
    unknown = [p for p in providers or () if p not in {*ort.get_all_providers(), *ort.get_available_providers()}]
    if unknown:  # a misspelt name would only be reported missing, and the graphs would run on the CPU
        raise ProjectableEdgeError(f"unknown execution provider(s) {unknown}: not a name onnxruntime {ort.__version__}"
                                   f" knows; check the spelling (installed here: "
                                   f"{', '.join(ort.get_available_providers())})")
    requested = list(providers or profile.execution_providers)
    if threads is None:  # the profile's count is the device's; never more threads than this machine has cores
        threads = min(int(profile.threads), os.cpu_count() or 1) if profile.threads else 0
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or not 0 <= threads <= MAX_THREADS:
        raise ProjectableEdgeError(f"threads must be an integer in 0..{MAX_THREADS} (0 = onnxruntime default), "
                                   f"got {threads!r}")
    threads = int(threads)

    def ort_runner(rel: str) -> OrtRunner:
        return OrtRunner(bundle_dir / rel, requested, threads, name=f"onnxruntime:{rel}")

    engine_path, reason = choose_engine(bundle_dir, engine, variant, backend, records)
    score = decode = None
    if engine_path is not None:
        from .trt_runner import TrtRunner

        try:
            score = TrtRunner(engine_path, name=f"tensorrt:{engine.path}")
            if engine.decode_path and (bundle_dir / engine.decode_path).is_file():  # its own record, same checks
                plan, why = choose_engine(bundle_dir, replace(engine, path=engine.decode_path), variant, backend,
                                          records)
                if plan is None:
                    reason += f"; the decode engine is not used: {why}"
                else:
                    decode = TrtRunner(plan, name=f"tensorrt:{engine.decode_path}")
        except Exception as e:  # CUDA missing, engine for another GPU, ...
            score, decode, reason = None, None, f"TensorRT engine could not be used ({e})"
    if backend is Backend.TENSORRT and score is None:
        raise ProjectableEdgeError(f"TensorRT backend requested but unusable: {reason}")
    on_trt = score is not None
    score = score or ort_runner(graphs.score)
    decode_graph = "TensorRT engine" if decode is not None else None
    if decode is None and graphs.decode:
        rel, decode_graph = compiled_decode(bundle_dir, engine, variant, requested)
        if rel is not None:
            try:
                decode = ort_runner(rel)
                check_io(decode, GraphKind.DECODE)
            except ProjectableEdgeError as e:  # e.g. an onnxruntime build without the contrib kernels
                decode, decode_graph = None, f"the compiled decode graph '{rel}' does not run here ({e})"
        decode = decode or ort_runner(graphs.decode)
    check_io(score, GraphKind.SCORING)
    if decode is not None:
        check_io(decode, GraphKind.DECODE)
    missing = sorted({p for r in (score, decode) if isinstance(r, OrtRunner) for p in r.missing_providers})
    used = {"score": list(score.providers), "decode": list(decode.providers) if decode is not None else []}
    return (score, decode), {
        "backend": str(Backend.TENSORRT if on_trt else Backend.ONNXRUNTIME), "reason": reason,
        "score_runner": score.name, "decode_runner": decode.name if decode is not None else None,
        "decode_graph": decode_graph,
        "providers_requested": requested, "providers_available": list(ort.get_available_providers()),
        "providers_missing": missing, "providers": used["score"], "decode_providers": used["decode"],
        "onnxruntime_version": ort.__version__, "threads": threads,
        "execution": execution_report(ort.get_available_providers(), requested, used),
    }
