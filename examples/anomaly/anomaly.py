"""Anomaly detection with one task bundle: is this image of my task, or not?

A task model's bits/dim is low on images like its training task and high on others, so a
threshold on it is an anomaly detector. The threshold is calibrated from in-task held-out
images at a chosen false-alarm rate and kept in this app's own config file (never in the
bundle, which stays as `generate` signed it):

    python examples/anomaly/anomaly.py calibrate BUNDLE --config anomaly.json --false-alarm-rate 0.05
    python examples/anomaly/anomaly.py score --config anomaly.json FOLDER_OR_FILES...
    python -c '...np.save(sys.stdout.buffer, images)' | python examples/anomaly/anomaly.py score --config anomaly.json -

`calibrate --reference OTHER_BUNDLES...` scores against other tasks' models too (bits/dim minus
the best of theirs), which stops simple images of other tasks passing as in-task.
`score` prints one JSON line per image: {"image", "score", "verdict", "threshold", "latency_ms"}.
Torch-free: numpy and the runtime's public API only (`projectable_edge_runtime.load`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

import projectable_edge_runtime as runtime
from projectable_edge_runtime import ProjectableEdgeError
from projectable_edge_runtime.bundle.atomic import atomic_output
from projectable_edge_runtime.commands.console import error_boundary
from projectable_edge_runtime.commands.inputs import read_inputs

CONFIG_FORMAT = "projectable-edge-anomaly"
CONFIG_VERSION = 1


# ----------------------------------------------------------------------------- the statistics

def threshold_at(scores, false_alarm_rate: float) -> float:
    """The score above which at most `false_alarm_rate` of the in-task calibration images lie.

    With n images at most floor(rate * n) may lie above; below rate 1/n that is none, so the
    threshold is the largest calibration score.
    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    if s.size == 0:
        raise ProjectableEdgeError("no calibration images: pass in-task images with --images, or a bundle "
                                   "with goldens")
    if not 0.0 <= false_alarm_rate < 1.0:
        raise ProjectableEdgeError(f"false-alarm rate must be in [0, 1), got {false_alarm_rate}; e.g. 0.05")
    allowed_above = int(np.floor(false_alarm_rate * s.size + 1e-9))
    return float(s[s.size - 1 - allowed_above])


def auroc(normal, anomalous) -> float:
    """Area under the ROC curve, anomalous scores as positives (ties count one half): Mann-Whitney U."""
    a, b = np.asarray(normal, np.float64), np.asarray(anomalous, np.float64)
    if a.size == 0 or b.size == 0:
        raise ProjectableEdgeError("AUROC needs at least one normal and one anomalous score")
    _, inverse, counts = np.unique(np.concatenate([a, b]), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    ranks = ((last - counts + 1 + last) / 2.0)[inverse.ravel()]  # tied scores share their mean rank
    u = ranks[a.size:].sum() - b.size * (b.size + 1) / 2
    return float(u / (a.size * b.size))


def rates(normal, anomalous, threshold: float) -> dict[str, float]:
    """False-alarm rate (normal images flagged) and miss rate (anomalies passed) at a threshold."""
    a, b = np.asarray(normal, np.float64), np.asarray(anomalous, np.float64)
    return {"false_alarm_rate": float((a > threshold).mean()) if a.size else float("nan"),
            "miss_rate": float((b <= threshold).mean()) if b.size else float("nan")}


def verdict(score: float, threshold: float) -> str:
    return "anomaly" if score > threshold else "normal"


# ----------------------------------------------------------------------------- inputs

def goldens(model) -> np.ndarray:
    """The bundle's held-out in-task images (tokens), named by its manifest."""
    if not model.goldens_path.is_file():
        raise ProjectableEdgeError(f"bundle {model.bundle_dir} has no goldens; calibrate with --images")
    with np.load(model.goldens_path, allow_pickle=False) as z:
        return model.to_tokens(z["tokens"])


# ----------------------------------------------------------------------------- config

def manifest_digest(bundle: Path) -> str:
    """Identifies the bundle a threshold belongs to: a threshold means nothing for another model."""
    return hashlib.sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest()


def write_config(path: Path, config: dict, overwrite: bool) -> None:
    """Atomically: a crash never leaves a half-written threshold for `score` to trust."""
    with atomic_output(path, overwrite=overwrite, what="anomaly config") as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def read_config(path: Path) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectableEdgeError(f"config '{path}' not found; run `anomaly.py calibrate BUNDLE --config {path}` "
                                   "first") from None
    except (OSError, ValueError) as e:
        raise ProjectableEdgeError(f"config '{path}' is not readable JSON ({e}); recalibrate it") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise ProjectableEdgeError(f"'{path}' is not an anomaly config (format {CONFIG_FORMAT!r}); recalibrate")
    missing = [k for k in ("bundle", "precision", "threshold", "manifest_sha256") if k not in config]
    if missing:
        raise ProjectableEdgeError(f"config '{path}' lacks {missing}; recalibrate it")
    return config


def _bundles_in(p: Path) -> list[Path]:
    if (p / "manifest.json").is_file():
        return [p]
    return sorted(d for d in p.iterdir() if (d / "manifest.json").is_file()) if p.is_dir() else []


def _task_name(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))["task"]["name"])


def find_references(paths: list[str], own: Path) -> list[Path]:
    """Other tasks' bundles (folders given, or every bundle inside a folder); bundles of the detector's
    own task are left out, so the folder holding one bundle per task can be passed as is."""
    out = []
    for p in map(Path, paths):
        found = _bundles_in(p)
        if not found:
            raise ProjectableEdgeError(f"reference '{p}' is neither a bundle nor a folder of bundles")
        out += [d for d in found if _task_name(d) != _task_name(own)]
    if not out:
        raise ProjectableEdgeError("no other task's bundle among --reference; pass bundles of other tasks "
                                   "(or the folder holding one bundle per task)")
    return out


class Detector:
    """The task model, and optionally other tasks' models whose best score is subtracted.

    Alone, the score is the image's bits/dim: low for in-task images, but also low for any simple
    image (few strokes), whatever its task. With references, the score is bits/dim minus the
    lowest bits/dim any other task's model gives the same image: how much better the image is
    explained by some other task; input complexity cancels out.
    """

    def __init__(self, bundle: Path, references: list[Path] = (), precision: str | None = None,
                 threads: int | None = None):
        self.model = runtime.load(bundle, precision=precision, threads=threads)
        self.references = [runtime.load(r, precision=precision, threads=threads) for r in references]
        names = [str(m.task.get("name")) for m in self.references]
        if str(self.model.task.get("name")) in names:
            raise ProjectableEdgeError(f"a reference bundle is for the detector's own task "
                                       f"{self.model.task.get('name')!r}; pass other tasks' bundles")

    @property
    def kind(self) -> str:
        return "bits_per_dim_minus_best_reference" if self.references else "bits_per_dim"

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        own = self.model.score(tokens)
        if not self.references:
            return own
        return own - np.min([r.score(tokens) for r in self.references], axis=0)

    def close(self) -> None:
        for m in (self.model, *self.references):
            m.close()

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _resolve(config_path: Path, text: str) -> Path:
    p = Path(text)
    return p if p.is_absolute() else Path(config_path).resolve().parent / p


def _check_bundle(bundle: Path, digest: str, config_path: Path) -> Path:
    if not (bundle / "manifest.json").is_file():
        raise ProjectableEdgeError(f"bundle '{bundle}' (from config '{config_path}') not found; fix the path in "
                                   "the config or recalibrate")
    if manifest_digest(bundle) != digest:
        raise ProjectableEdgeError(f"bundle '{bundle}' is not the one config '{config_path}' was calibrated on "
                                   "(manifest differs); recalibrate")
    return bundle


def open_detector(config: dict, config_path: Path) -> Detector:
    """The config's detector at its precision, refusing any bundle other than the calibrated ones."""
    bundle = _check_bundle(_resolve(config_path, config["bundle"]), config["manifest_sha256"], config_path)
    refs = [_check_bundle(_resolve(config_path, r["bundle"]), r["manifest_sha256"], config_path)
            for r in config.get("references", [])]
    return Detector(bundle, refs, precision=config["precision"], threads=config.get("threads"))


# ----------------------------------------------------------------------------- commands

def calibrate(bundle: Path, false_alarm_rate: float, precision: str | None = None, images: str | None = None,
              threads: int | None = None, references: list[str] | None = None) -> dict:
    """Score in-task held-out images and pick the threshold for the false-alarm rate: the config."""
    refs = find_references(references, Path(bundle)) if references else []
    with Detector(Path(bundle), refs, precision=precision, threads=threads) as det:
        model = det.model
        if images:
            tokens = np.concatenate([t for _, t in read_inputs(model, [images])])
        else:
            tokens = goldens(model)
        scores = det.scores(tokens)
        th = threshold_at(scores, false_alarm_rate)
        return {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "bundle": str(Path(bundle).resolve()),
                "manifest_sha256": manifest_digest(bundle), "task": model.task.get("name"),
                "precision": model.variant, "threads": threads, "score": det.kind,
                "references": [{"bundle": str(r.resolve()), "manifest_sha256": manifest_digest(r),
                                "task": m.task.get("name")} for r, m in zip(refs, det.references)],
                "false_alarm_rate": false_alarm_rate, "threshold": th,
                "calibration": {"images": images or "bundle goldens", "n_images": int(len(scores)),
                                "observed_false_alarm_rate": float((scores > th).mean()),
                                "smallest_resolvable_rate": 1.0 / len(scores),
                                "score_mean": float(scores.mean()), "score_max": float(scores.max())}}


def score_stream(detector: Detector, threshold: float, inputs, emit) -> int:
    """Score images one at a time (as they would arrive), emitting one JSON-able dict each; returns anomalies."""
    n_anomalies = 0
    for name, tokens in inputs:
        t0 = time.perf_counter()
        s = float(detector.scores(tokens)[0])
        ms = (time.perf_counter() - t0) * 1e3
        v = verdict(s, threshold)
        n_anomalies += v == "anomaly"
        emit({"image": name, "score": round(s, 6), "verdict": v, "threshold": round(threshold, 6),
              "latency_ms": round(ms, 4)})
    return n_anomalies


def _print_line(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _cmd_calibrate(args) -> int:
    config = calibrate(Path(args.bundle), args.false_alarm_rate, args.precision, args.images, args.threads,
                       args.reference)
    write_config(Path(args.config), config, args.overwrite)
    c = config["calibration"]
    print(json.dumps({"config": str(Path(args.config).resolve()), "task": config["task"],
                      "precision": config["precision"], "score": config["score"], "threshold": config["threshold"],
                      "false_alarm_rate": config["false_alarm_rate"], **c}))
    if args.false_alarm_rate and args.false_alarm_rate < c["smallest_resolvable_rate"]:
        print(f"note: {c['n_images']} calibration images cannot resolve a rate below "
              f"{c['smallest_resolvable_rate']:.3f}; the threshold is their largest score", file=sys.stderr)
    return 0


def _cmd_score(args) -> int:
    config = read_config(Path(args.config))
    with open_detector(config, Path(args.config)) as detector:
        inputs = read_inputs(detector.model, args.inputs or ["-"])
        n = score_stream(detector, float(config["threshold"]), inputs, _print_line)
    return 1 if (args.fail_on_anomaly and n) else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="anomaly.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibrate", help="pick the threshold from in-task held-out images")
    c.add_argument("bundle", help="a task bundle written by `projectable-edge generate`")
    c.add_argument("--config", required=True, help="the app's config file to write (JSON)")
    c.add_argument("--false-alarm-rate", type=float, default=0.05,
                   help="share of in-task images that may be flagged (default 0.05)")
    c.add_argument("--precision", help="graph variant: fp32, fp16, int8 (default: the bundle's selected one)")
    c.add_argument("--images", help="in-task held-out images (folder, .npy) instead of the bundle's goldens")
    c.add_argument("--threads", type=int, help="onnxruntime threads (default: the target profile's)")
    c.add_argument("--reference", nargs="+", metavar="BUNDLE",
                   help="other tasks' bundles (or a folder of them): score = bits/dim minus the best of theirs")
    c.add_argument("--overwrite", action="store_true", help="replace an existing config")
    s = sub.add_parser("score", help="score images, one JSON line each")
    s.add_argument("inputs", nargs="*", help="image files, folders, .npy files; '-' (default) = .npy on stdin")
    s.add_argument("--config", required=True, help="the config `calibrate` wrote")
    s.add_argument("--fail-on-anomaly", action="store_true", help="exit 1 when any image is an anomaly")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn = {"calibrate": _cmd_calibrate, "score": _cmd_score}[args.command]
    return error_boundary(lambda: fn(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
