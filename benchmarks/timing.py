"""The one timing loop every benchmark shares: interleaved rounds with a rotated order, and the median of per-round
ratios. numpy and the standard library only, so a benchmark that times subprocesses loads nothing heavy."""
from __future__ import annotations

import time

import numpy as np


def interleaved(fns: dict, rounds: int, reps: dict) -> dict[str, np.ndarray]:
    """Seconds per call, [rounds] per function (the median of its reps[name] calls in that round); every
    round runs every function, order rotated, so a burst of load on the shared host hits all of them."""
    names, times = list(fns), {n: np.empty(rounds) for n in fns}
    for n in names:  # warm-up
        fns[n]()
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            ts = []
            for _ in range(reps.get(n, 1)):
                t0 = time.perf_counter()
                fns[n]()
                ts.append(time.perf_counter() - t0)
            times[n][r] = np.median(ts)
    return times


def ratio(slow: np.ndarray, fast: np.ndarray) -> float:
    """Median over rounds of the per-round time ratio: robust to load that drifts between rounds."""
    return float(np.median(slow / fast))
