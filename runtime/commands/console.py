"""What the device CLI (argparse) and the host CLI (typer) share, so a command looks and fails the same in both:
the error boundary, JSON and table output, the text reports, and the `sample` command."""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..devices.errors import ProjectableEdgeError
from .png import image_grid, write_png


def error_boundary(fn: Callable[[], Any], *, verbose: bool = False,
                   say: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
                   passthrough: tuple[type[BaseException], ...] = ()) -> int:
    """Run fn; return its int exit code (None = 0), or 2 for a ProjectableEdgeError and 1 for any other
    error, each said in one line (--verbose adds the traceback)."""
    try:
        result = fn()
    except passthrough:
        raise
    except Exception as e:
        if verbose:
            traceback.print_exc()
        if isinstance(e, ProjectableEdgeError):
            say(f"error: {e}")
            return 2
        say(f"error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)")
        return 1
    return int(result or 0)


def filter_boundary(fn: Callable[[], Any], *, verbose: bool = False) -> int:
    """error_boundary for a command whose output is piped: a reader that goes away (`... | head`)
    ends it quietly with status 0, like any Unix filter."""
    try:
        return error_boundary(fn, verbose=verbose, passthrough=(BrokenPipeError,))
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def fmt(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def table(rows: list[tuple]) -> str:
    """Left-aligned columns, first row as header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def execution_lines(execution: dict | None) -> list[str]:
    """The execution-provider report (available / used) and the GPU fix when one applies."""
    if not execution:
        return []
    used = execution.get("used", {})
    lines = [f"  providers: available {', '.join(execution['available']) or '-'}; ran "
             + "; ".join(f"{g}: {', '.join(p)}" for g, p in used.items() if p)]
    if execution.get("missing"):
        lines.append(f"  requested but not in this onnxruntime build: {', '.join(execution['missing'])}")
    if execution.get("gpu_visible"):
        lines.append(f"  GPU visible: {execution['gpu_visible']}; tensorrt importable: "
                     f"{'yes' if execution.get('tensorrt_importable') else 'no'}")
    if execution.get("emulated"):
        lines.append("  running under emulation (ARM on an x86 CPU): timings are not device timings")
    if execution.get("gpu_hint"):
        lines.append(f"  hint: {execution['gpu_hint']}")
    return lines


def benchmark_text(out: dict) -> str:
    lines = [f"benchmark {out['variant']} on {', '.join(out['providers'])} ({out['backend']}: "
             f"{out['backend_reason']}); load {out['load_time_ms']:.1f} ms"]
    keys = ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "spread_p99_over_p50", "throughput_per_s")
    lines.append(table([("case", "p50 ms", "p90 ms", "p99 ms", "mean", "std", "p99/p50", "items/s")]
                       + [(k, *(fmt(r[f]) for f in keys)) for k, r in out["results"].items()]))
    if out.get("peak_rss_mb") is not None:
        lines.append(f"  peak memory (RSS): {out['peak_rss_mb']:.1f} MB")
    lines += [f"  {c['name']}: {c['value']:.2f} (budget {c['budget']}) {'ok' if c['passed'] else 'OVER'}"
              for c in out["checks"]] + execution_lines(out.get("execution"))
    note = out["host"]["note"]
    lines.append(f"verdict: {out['verdict'].upper()}" + (f"  [{note}]" if note else ""))
    return "\n".join(lines)


def validate_text(out: dict) -> str:
    head = f"validate {out['variant']} ({out['backend']}, {', '.join(out['providers'])}): {out['verdict'].upper()}"
    rows = [("bits/dim", "expected", "delta", "tolerance", "images"),
            tuple(fmt(out[k]) for k in ("bits", "expected_bits", "delta", "tolerance", "n_images"))]
    return "\n".join([head, table(rows), f"  expected = {out['compared_with']}",
                      *execution_lines(out.get("execution"))])


def info_text(model) -> str:
    b = model.backend
    decode = f"{b['decode_runner']} ({b['decode_graph']})" if b["decode_runner"] else "none: sampling recomputes"
    return "\n".join([repr(model), f"  candidates: {', '.join(model.info()['candidates'])}",
                      f"  backend reason: {b['reason']}", f"  decode graph: {decode}", *execution_lines(b["execution"])])


def score_text(names: list[str], bits: np.ndarray, variant: str) -> str:
    rows = [("input", "bits/dim")] + [(n, f"{b:.4f}") for n, b in zip(names, bits)]
    return f"{table(rows)}\nmean {bits.mean():.4f} bits/dim ({variant})"


def sample_grid(model, n: int, out: str | Path, *, seed: int = 0, temperature: float = 1.0,
                top_k: int | None = None, cols: int | None = None, scale: int = 4,
                tokens_out: str | None = None) -> dict[str, Any]:
    """Sample n images, write them as one PNG grid (8 per row by default); the command's JSON result."""
    tokens = model.sample(n, temperature=temperature, top_k=top_k, seed=seed)
    path = write_png(out, image_grid(model.decode_images(tokens), cols=cols or min(8, len(tokens)), scale=scale))
    if tokens_out:
        np.save(tokens_out, tokens)
    bits = model.score(tokens)
    return {"png": str(path), "n": int(len(tokens)), "seed": seed, "variant": model.variant,
            "backend": model.backend["backend"], "providers": model.backend["providers"],
            "tokens_out": tokens_out, "mean_bits_per_dim": float(bits.mean())}
