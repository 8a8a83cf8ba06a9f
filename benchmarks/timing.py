"""The one timing loop every benchmark shares: interleaved rounds with a rotated order, and the median of per-round
ratios; and the error boundary every benchmark's main runs behind. numpy and the standard library only (the
boundary imports the runtime's console when an error reaches it), so a benchmark that times subprocesses loads
nothing heavy."""
from __future__ import annotations

import argparse
import sys
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


def at_least(n: int):
    """An argparse type: an integer >= n (a count of rounds, runs, draws or steps); else a usage error, exit 2."""
    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = n - 1
        if value < n:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {n}")
        return value
    return count


def run_main(main, json_stdout: bool = False) -> None:
    """Exit with main()'s status; a user error (ProjectableEdgeError: a wrong run, bundle, task or option) is its one
    line and exit 2, as in the CLIs (with json_stdout, a --json on the command line also gets it on stdout as
    {"error", "exit_code"}); any other error keeps its traceback."""
    try:
        code = main()
    except Exception as e:
        from projectable_edge_runtime import ProjectableEdgeError
        from projectable_edge_runtime.commands.console import fail, one_line, wants_json

        if not isinstance(e, ProjectableEdgeError):
            raise
        code = fail(f"error: {one_line(e)}", 2, json_stdout and wants_json(sys.argv[1:]))
    sys.exit(code or 0)
