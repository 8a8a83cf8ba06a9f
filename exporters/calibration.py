"""Calibration data for static INT8: the feeds ONNX Runtime's calibrator runs the fp32 graph on. A scoring
graph is fed batches of the task's training tokens; a decode graph every step of a teacher-forced fp32
rollout, so the KV-cache inputs see realistic ranges at every past length.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from projectable_edge_runtime.graphs.contract import GraphKind, rollout
from projectable_edge_runtime.graphs.runners import OrtRunner


def calibration_reader(fp32_path: Path, spec, tokens: np.ndarray, batch: int = 32):
    """An onnxruntime.quantization CalibrationDataReader over the task's tokens."""
    from onnxruntime.quantization import CalibrationDataReader

    if spec.kind is GraphKind.SCORING:
        feeds = [{"tokens": tokens[i:i + batch]} for i in range(0, len(tokens), batch)]
    else:
        runner, feeds = OrtRunner(fp32_path, threads=1), []
        for i in range(0, len(tokens), batch):
            rollout(runner, spec.layout, tokens[i:i + batch], on_feed=feeds.append)

    class _Reader(CalibrationDataReader):
        def get_next(self):
            return next(self.feeds, None)

        def rewind(self):
            self.feeds = iter(feeds)

    reader = _Reader()
    reader.rewind()
    return reader
