"""What the device CLI (argparse) and the host CLI (typer) share, so a command looks and fails the same in both:
the error boundary, JSON and table output, the text reports, and the `sample` command."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..devices.errors import ProjectableEdgeError
from ..bundle.atomic import INTERRUPTED, atomic_output
from ..graphs import sampler
from .png import grid_size, image_grid, png_bytes


# what the user can fix about a path the system refused: errno -> the fix
_PATH_FIXES = {errno.EACCES: "give this user access to it, or choose another path", errno.EPERM: "choose another path",
               errno.ENAMETOOLONG: "choose a shorter name", errno.EROFS: "choose a folder on a writable file system",
               errno.ENOSPC: "free some space, or choose another folder", errno.EDQUOT: "free some space, or choose "
               "another folder", errno.ELOOP: "fix the symbolic link"}


def one_line(e: BaseException) -> str:
    """An error's message on one line (a library's message may hold line breaks)."""
    return " ".join(line.strip() for line in str(e).splitlines())


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for --json (before any `--`)."""
    return "--json" in argv[:argv.index("--") if "--" in argv else len(argv)]


def fail(line: str, code: int, json_errors: bool = False, say: Callable[[str], None] = _stderr) -> int:
    """Say an error's one line and return its exit code; under --json stdout also gets it, as its one JSON document
    {"error", "exit_code"} on one line (also a JSON Lines event, for serve), so a caller parsing stdout reads the
    failure instead of nothing."""
    say(line)
    if json_errors:
        with contextlib.suppress(OSError, ValueError):  # stdout closed or gone: the line above was said
            print(json.dumps({"error": line.removeprefix("error: "), "exit_code": code}), flush=True)
    return code


def error_boundary(fn: Callable[[], Any], *, verbose: bool = False, say: Callable[[str], None] = _stderr,
                   passthrough: tuple[type[BaseException], ...] = (), json_errors: bool = False) -> int:
    """Run fn; return its int exit code (None = 0), or 2 for a ProjectableEdgeError or a path the system refused
    (permissions, a name too long, a full disk), 130 when interrupted, and 1 for any other error, each said in
    one line (--verbose adds the traceback; json_errors: also on stdout as JSON, see `fail`)."""
    try:
        return int(fn() or 0)
    except passthrough:
        raise
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see cli_signals); outputs being written were removed
        return fail("error: interrupted", 130, json_errors, say)
    except Exception as e:
        if isinstance(e, BrokenPipeError) and _reader_gone():  # `... | head`: ends quietly, like any Unix filter
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
        if verbose:
            traceback.print_exc()
        if INTERRUPTED.is_set():  # a library turned the interrupt into its own error (torch.onnx: "export failed")
            return fail("error: interrupted", 130, json_errors, say)
        if isinstance(e, ProjectableEdgeError):
            return fail(f"error: {one_line(e)}", 2, json_errors, say)
        if isinstance(e, OSError) and e.errno in _PATH_FIXES:
            path = f" '{e.filename}'" if e.filename else ""
            return fail(f"error: cannot use{path}: {e.strerror}; {_PATH_FIXES[e.errno]}", 2, json_errors, say)
        hint = "" if verbose else " (rerun with --verbose for the traceback)"
        return fail(f"error: {type(e).__name__}: {one_line(e)}{hint}", 1, json_errors, say)


def cli_signals() -> None:
    """SIGTERM stops a CLI as Ctrl-C does (outputs being written are removed), both also set atomic.INTERRUPTED
    (a library may swallow the KeyboardInterrupt), and warnings print as one line, without the source line."""
    def interrupt(signum, frame):
        INTERRUPTED.set()
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # (not where the shell made it ignored)
        signal.signal(signal.SIGINT, interrupt)
    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"


def take_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """argv without any --verbose or -v (so it may come before or after the command, in both CLIs), and whether
    one was there; a `--` ends the options."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a not in ("--verbose", "-v")] + argv[end:]
    return kept, len(kept) != len(argv)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll says POLLERR), not some other pipe that broke."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no real stdout (a test's capture) or no poll()
        return False


def printable(text: str) -> str:
    """Text with a file name that is not UTF-8 (its bytes kept as surrogates) shown with U+FFFD, which a strict
    UTF-8 stdout (e.g. en_US.UTF-8) can print."""
    return text.encode(errors="surrogateescape").decode(errors="replace")


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
    lines = [f"  providers: available {', '.join(execution['available']) or '-'}; ran "
             + "; ".join(f"{g}: {', '.join(p)}" for g, p in execution.get("used", {}).items() if p)]
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
                      f"  backend reason: {b['reason']}", f"  decode graph: {decode}",
                      *execution_lines(b["execution"])])


def score_text(names: list[str], bits: np.ndarray, variant: str) -> str:
    rows = [("input", "bits/dim")] + [(n, f"{b:.4f}") for n, b in zip(names, bits)]
    return f"{table(rows)}\nmean {bits.mean():.4f} bits/dim ({variant})"


def outside_bundle(bundle: str | Path, path: str | Path, what: str = "output",
                   fix: str = "write it outside the bundle folder") -> None:
    """Refuse an output inside the bundle: the manifest lists its files, and the loader refuses any other file or a
    changed one. The output's folder is resolved, not the output (a link there is replaced, not followed)."""
    p = Path(path)
    if Path(bundle).resolve() in (p.parent.resolve() / p.name).parents:
        raise ProjectableEdgeError(f"{what} {p} is inside the bundle {bundle}, which lists its own files and refuses "
                                   f"any other when loaded; {fix}")


def check_png(path, what: str) -> None:
    """An image is written as PNG bytes over whatever file `path` names: a name that is not .png (a typo such as
    RUN/config.json, or grid.jpg that viewers would misread) is refused before any work."""
    if path is not None and Path(path).suffix.lower() not in ("", ".png"):
        raise ProjectableEdgeError(f"{what} is written as a PNG image, but '{path}' names a {Path(path).suffix} file; "
                                   f"name it .png (e.g. {Path(path).with_suffix('.png')})")


def sample_grid(model, n: int, out: str | Path, *, seed: int = 0, temperature: float = 1.0,
                top_k: int | None = None, cols: int | None = None, scale: int = 4,
                tokens_out: str | None = None) -> dict[str, Any]:
    """Sample n images, write them as one PNG grid (8 per row by default) and, with tokens_out, the tokens as .npy;
    the command's JSON result. The grid's size and both outputs are checked before sampling, and neither is
    written unless both can be."""
    sampler.check_args(n, temperature, top_k, model.tokenizer.vocab_size, seed)
    cols = min(8, n) if cols is None else cols
    grid_size(n, model.tokenizer.image_shape[:2], cols, scale=scale)
    tokens_path = None if tokens_out is None else Path(str(tokens_out).removesuffix(".npy") + ".npy")  # as np.save
    check_png(out, "the samples grid")
    for p in filter(None, (Path(out), tokens_path)):
        outside_bundle(model.bundle_dir, p)
    with contextlib.ExitStack() as outputs:
        png_tmp = outputs.enter_context(atomic_output(out, overwrite=True, what="PNG"))
        npy_tmp = tokens_path and outputs.enter_context(atomic_output(tokens_path, overwrite=True,
                                                                      what="tokens file"))
        tokens = model.sample(n, temperature=temperature, top_k=top_k, seed=seed)
        png_tmp.write_bytes(png_bytes(image_grid(model.decode_images(tokens), cols=cols, scale=scale)))
        if npy_tmp:
            np.save(npy_tmp, tokens)  # the temp name keeps the .npy suffix, so np.save adds none
    bits = model.score(tokens)
    return {"png": str(Path(out)), "n": int(len(tokens)), "seed": seed, "variant": model.variant,
            "backend": model.backend["backend"], "providers": model.backend["providers"],
            "tokens_out": None if tokens_path is None else str(tokens_path), "mean_bits_per_dim": float(bits.mean())}
