"""`<plan>.record.json` of each TensorRT engine built on the device, written by build_engine.sh after trtexec.
The sealed manifest cannot list a plan built after it, so the record does: the TensorRT version that built it
(trusted over the profile's), the device, the sha256 and size of the plan and its build log, and a test
inference on the goldens against the PyTorch reference."""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import platform
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Callable

import numpy as np

from .atomic import atomic_output
from ..commands import console
from ..devices.errors import ProjectableEdgeError
from ..graphs.contract import CacheLayout, GraphKind, graph_logits
from ..graphs import hardware
from .manifest import ENGINE_RECORD_SUFFIX, EngineStatus, engine_plans, file_info, read_manifest
from ..graphs.scoring import bits_per_dim

RECORD_SCHEMA = 1
LOG_NAME = "build_engine.log"  # trtexec's output, tee'd by the per-graph script


def _test_inference(runner, kind: GraphKind, c, tokens: np.ndarray, max_batch: int) -> dict[str, Any]:
    """bits/dim of the plan on the goldens against the fp32 PyTorch reference, with the candidate's tolerance."""
    logits = graph_logits(runner, kind, CacheLayout.of(dataclasses.asdict(c.model)), tokens, chunk=max_batch)
    bits = float(bits_per_dim(logits, tokens).mean())
    expected, tol = c.accuracy.reference_bits, c.accuracy.tolerance
    passed = bool(np.isfinite(bits) and abs(bits - expected) <= tol)
    out = {"passed": passed, "graph": str(kind), "variant": c.variant, "n_images": int(len(tokens)),
           "bits": bits, "expected_bits": expected, "tolerance": tol}
    if not passed:
        out["reason"] = f"bits/dim {bits:.4f} vs the PyTorch reference {expected:.4f} (tolerance {tol:.4f})"
    return out


def write_records(bundle_dir: str | Path, tensorrt_version: str | None = None, device: str | None = None,
                  runner_factory: Callable[[Path], Any] | None = None, log=print) -> dict[str, dict]:
    """Write `<plan>.record.json` for every device-built plan in the bundle; {plan: record}."""
    d = Path(bundle_dir)
    manifest = read_manifest(d)  # the manifest itself must be intact
    plans = [p for p in engine_plans(manifest, EngineStatus.DEFERRED) if (d / p).is_file()]
    if not plans:
        fix = {EngineStatus.DEFERRED: "run build_engine.sh first",
               EngineStatus.BUILT: "its engine was built with the bundle and the manifest pins it: nothing to record",
               }.get(manifest.engine.status, "only a bundle of a TensorRT target (generate --target jetson) has "
                                             "plans to build and record on the device")
        raise ProjectableEdgeError(f"bundle {d}: no device-built TensorRT plan to record (engine.status is "
                                   f"{str(manifest.engine.status)!r}); {fix}")
    c = next(c for c in manifest.main_candidates().values() if c.variant == manifest.engine.variant)
    version, why = (tensorrt_version, "") if tensorrt_version else hardware.tensorrt_version()
    if version is None:
        raise ProjectableEdgeError(f"cannot read the TensorRT version ({why}); install TensorRT's Python bindings "
                                   "(JetPack ships them) or pass --tensorrt-version")
    device = device or hardware.jetson_model() or f"{platform.node()} ({platform.machine()})"
    if runner_factory is None:
        from ..graphs.trt_runner import TrtRunner

        runner_factory = TrtRunner
    with np.load(d / c.goldens, allow_pickle=False) as z:
        tokens = z["tokens"].astype(np.int64)
    trt = manifest.target.tensorrt
    max_batch = int(trt.max_shapes.get("batch", 1)) if trt else 1
    records = {}
    for plan in plans:
        kind = GraphKind.DECODE if plan == manifest.engine.decode_path else GraphKind.SCORING
        try:
            test = _test_inference(runner_factory(d / plan), kind, c, tokens, max_batch)
        except Exception as e:  # the engine does not load or run here: record why
            test = {"passed": False, "graph": str(kind), "reason": f"{type(e).__name__}: {e}"}
        log_rel = str(PurePosixPath(plan).parent / LOG_NAME)
        files = {rel: file_info(d / rel) for rel in (plan, log_rel) if (d / rel).is_file()}
        rec = {"schema": RECORD_SCHEMA, "plan": plan, "tensorrt_version": version, "device": device,
               "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "profile_tensorrt_version": manifest.target.software.get("tensorrt"),
               "files": files, "test_inference": test}
        with atomic_output(d / (plan + ENGINE_RECORD_SUFFIX), overwrite=True) as tmp:
            tmp.write_text(json.dumps(rec, indent=2) + "\n", encoding="utf-8")
        log(f"{plan + ENGINE_RECORD_SUFFIX}: TensorRT {version} on {device}, test inference "
            f"{'passed' if test['passed'] else 'FAILED: ' + test.get('reason', '')}")
        records[plan] = rec
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m projectable_edge_runtime.bundle.engine_record",
                                 description="Record device-built TensorRT engines of a bundle (run by build_engine.sh).")
    ap.add_argument("bundle")
    ap.add_argument("--tensorrt-version", help="default: tensorrt.__version__")
    ap.add_argument("--device", help="default: the Jetson's model, else the host name")
    ap.add_argument("--verbose", "-v", action="store_true")
    args = ap.parse_args(argv)

    def run() -> int:
        recs = write_records(args.bundle, args.tensorrt_version, args.device)
        return 0 if all(r["test_inference"]["passed"] for r in recs.values()) else 1

    return console.error_boundary(run, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
