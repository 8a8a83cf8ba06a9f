"""Classify by likelihood: N task bundles, and an image belongs to the task whose model explains it best.

Each bundle (one per task, from `projectable-edge generate --task T` in a loop) scores the image in
bits/dim; the prediction is the task with the lowest. Torch-free: numpy and the runtime's public API.

    python examples/classify/classify.py BUNDLES_FOLDER_OR_BUNDLES... --images FOLDER_OR_FILES... [--precision int8]
    python -c '...np.save(sys.stdout.buffer, images)' | python examples/classify/classify.py BUNDLES... --images -

Prints one JSON line per image: {"image", "task" (predicted), "bits_per_dim" {task: bits}, "latency_ms"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import projectable_edge_runtime as runtime
from projectable_edge_runtime import ProjectableEdgeError
from projectable_edge_runtime.commands.console import error_boundary
from projectable_edge_runtime.commands.inputs import read_inputs



def find_bundles(paths: list[str]) -> list[Path]:
    """Bundle folders given directly, or every bundle (a folder with manifest.json) inside a given folder."""
    out = []
    for p in map(Path, paths):
        if (p / "manifest.json").is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(d for d in p.iterdir() if (d / "manifest.json").is_file())
            if not found:
                raise ProjectableEdgeError(f"'{p}' is neither a bundle nor a folder of bundles (no manifest.json)")
            out += found
        else:
            raise ProjectableEdgeError(f"bundle '{p}' not found; pass bundle folders or a folder holding them")
    if len(out) < 2:
        raise ProjectableEdgeError(f"classifying needs at least two task bundles, got {len(out)}; generate one per "
                                   "task (`projectable-edge generate --task T` for each T)")
    return out


class Classifier:
    """N task models sharing one tokenizer; `bits` scores images under every one of them."""

    def __init__(self, bundles: list[Path], precision: str | None = None, threads: int | None = None):
        self.models = [runtime.load(b, precision=precision, threads=threads) for b in bundles]
        self.tasks = [str(m.task.get("name")) for m in self.models]
        self._check_compatible(bundles)

    def _check_compatible(self, bundles: list[Path]) -> None:
        dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dup:
            raise ProjectableEdgeError(f"two bundles are for the same task ({', '.join(dup)}); pass one bundle per task")
        spec = self.models[0].tokenizer
        for b, m in zip(bundles, self.models):
            if m.tokenizer != spec:
                raise ProjectableEdgeError(f"bundle '{b}' tokenizes images as {m.tokenizer.to_dict()}, but "
                                           f"'{bundles[0]}' as {spec.to_dict()}; use bundles from one source run")

    @property
    def tokenizer(self):
        return self.models[0].tokenizer

    def to_tokens(self, x) -> np.ndarray:
        return self.models[0].to_tokens(x)

    def bits(self, x) -> np.ndarray:
        """Bits/dim of each image under each task's model: float64 [N_images, N_tasks]."""
        tokens = self.to_tokens(x)
        return np.stack([m.score(tokens) for m in self.models], axis=1)

    def predict(self, x) -> list[str]:
        return [self.tasks[i] for i in np.argmin(self.bits(x), axis=1)]

    def close(self) -> None:
        for m in self.models:
            m.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- command

def classify_stream(clf: Classifier, inputs, emit) -> None:
    """Classify images one at a time (as an app receives them), emitting one JSON-able dict each."""
    for name, tokens in inputs:
        t0 = time.perf_counter()
        bits = clf.bits(tokens)[0]
        ms = (time.perf_counter() - t0) * 1e3
        emit({"image": name, "task": clf.tasks[int(np.argmin(bits))],
              "bits_per_dim": {t: round(float(b), 6) for t, b in zip(clf.tasks, bits)},
              "latency_ms": round(ms, 4)})


def _print_line(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _run(args) -> int:
    with Classifier(find_bundles(args.bundles), precision=args.precision, threads=args.threads) as clf:
        classify_stream(clf, read_inputs(clf, args.images), _print_line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="classify.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", help="task bundles, or a folder holding one bundle per task")
    ap.add_argument("--images", nargs="+", default=["-"],
                    help="image files, folders, .npy files; '-' (default) = .npy on stdin")
    ap.add_argument("--precision", help="graph variant for every bundle: fp32, fp16, int8 (default: each one's selected)")
    ap.add_argument("--threads", type=int, help="onnxruntime threads per model (default: the target profile's)")
    ap.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return error_boundary(lambda: _run(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
