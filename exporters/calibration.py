"""Calibration data for static INT8: the feeds ONNX Runtime's calibrator runs the fp32 graph on.

A scoring graph is fed batches of the task's training tokens; a decode graph is fed every step
of a teacher-forced fp32 rollout (runtime.graphs.rollout), so the KV-cache inputs see realistic
ranges at every past length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from projectable_edge_runtime.graphs import GraphKind, rollout
from projectable_edge_runtime.runners import OrtRunner


def calibration_feeds(fp32_path: Path, spec, tokens: np.ndarray, batch: int = 32) -> list[dict]:
    if spec.kind is GraphKind.SCORING:
        return [{"tokens": tokens[i:i + batch]} for i in range(0, len(tokens), batch)]
    runner, feeds = OrtRunner(fp32_path, threads=1), []
    for i in range(0, len(tokens), batch):
        rollout(runner, spec.layout, tokens[i:i + batch], on_feed=feeds.append)
    return feeds


def calibration_reader(fp32_path: Path, spec, tokens: np.ndarray, batch: int = 32):
    """An onnxruntime.quantization CalibrationDataReader over the task's tokens."""
    from onnxruntime.quantization import CalibrationDataReader

    feeds = calibration_feeds(fp32_path, spec, tokens, batch)

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

        def rewind(self):
            self._it = iter(feeds)

    return _Reader()
