"""`python -m projectable_edge_runtime COMMAND BUNDLE ...`: the device CLI (stdlib argparse: no typer on a device).

Exit codes: 0 ok, 1 a check failed (validate, benchmark, tune) or an unexpected error, 2 an error the user
can fix. Output and errors go through commands.console, shared with the host CLI."""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .bundle.load import load
from .bundle.manifest import json_schema
from .commands import console, serve, tune
from .commands.benchmark import benchmark
from .commands.inputs import read_inputs
from .commands.validate import validate
from .devices.choices import values
from .devices.errors import ProjectableEdgeError
from .graphs.backends import Backend


def _abspath(text: str) -> str:
    """Made absolute when parsed, so nothing depends on a later cwd ("" is refused, not taken for the cwd)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; pass a bundle folder or file path")
    return os.path.abspath(os.path.expanduser(text))


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error, like every other error of the CLI (exit 2)."""

    def error(self, message: str):
        raise ProjectableEdgeError(f"{message} (see '{self.prog} --help')")


def build_parser(prog: str = "python -m projectable_edge_runtime") -> argparse.ArgumentParser:
    c = _Parser(add_help=False)  # what every command on a bundle takes
    c.add_argument("bundle", type=_abspath, help="bundle directory (bundles/<task>__<target>)")
    c.add_argument("--precision",
                   help="graph variant, e.g. fp32, fp16, int8 (default: the one selected for the target)")
    c.add_argument("--candidate", help="a (size, precision) candidate SIZE/VARIANT of a ladder bundle (default: "
                                       "the tuned choice next to the bundle, else the one selected for the target)")
    c.add_argument("--providers", help="comma-separated onnxruntime execution providers (default: the target's)")
    c.add_argument("--backend", default="auto", choices=values(Backend))
    c.add_argument("--json", action="store_true", help="print machine-readable JSON")
    c.add_argument("--public-key", help="Ed25519 public key (PEM): refuse a bundle not signed with it "
                                        "(needs the cryptography package)")
    c.add_argument("--verbose", "-v", action="store_true", help="show tracebacks (also before the command)")
    ap = _Parser(prog=prog, description="Torch-free projectable-edge runtime.")
    sub = ap.add_subparsers(dest="command", required=True)
    c.add_argument("--tuned", type=_abspath, help="a tuned record written by `tune --record PATH` (default: "
                                                  "BUNDLE.tuned.json beside the bundle, if any)")
    sub.add_parser("info", parents=[c], help="show what the bundle holds and which backend runs it")
    v = sub.add_parser("validate", parents=[c],
                       help="bits/dim on the bundle's held-out images vs the PyTorch reference")
    v.add_argument("--tolerance", type=float, help="bits/dim tolerance (default: the candidate's)")
    b = sub.add_parser("benchmark", parents=[c], help="latency percentiles, throughput, memory, budget verdict")
    b.add_argument("--runs", type=int, default=100)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--sample-runs", type=int, default=None)
    b.add_argument("--raw", action="store_true", help="include every timing (times_ms) in the JSON")
    s = sub.add_parser("sample", parents=[c], help="generate images and write a PNG grid")
    s.add_argument("-n", type=int, default=16)
    s.add_argument("--out", type=_abspath, default="samples.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--cols", type=int, default=None, help="images per row (default: up to 8)")
    s.add_argument("--scale", type=int, default=4)
    s.add_argument("--tokens-out", type=_abspath, help="also save the sampled tokens as .npy")
    sub.add_parser("schema", help="print the JSON Schema of manifest.json (derived from the runtime's format)")
    sc = sub.add_parser("score", parents=[c], help="bits/dim of image files, folders, .npy arrays of images or "
                                                   "tokens, or '-' (.npy on stdin)")
    sc.add_argument("images", nargs="+")
    t = sub.add_parser("tune", parents=[c], help="measure every candidate here, pick the most accurate within "
                                                 "budget, record it next to the bundle (exit 1: none fits)")
    t.add_argument("--p99-ms", type=float, help="p99 latency budget, score batch 1 (default: the profile's)")
    t.add_argument("--max-mb", type=float, help="peak memory budget in MB (default: the profile's)")
    t.add_argument("--runs", type=int, default=200)
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--record", type=_abspath, help="where to write the record (default: BUNDLE.tuned.json beside it)")
    t.add_argument("--reuse", action="store_true", help="pick again from the record's measurements (new budgets, "
                                                        "no re-measuring)")
    serve.add_arguments(sub.add_parser("serve", parents=[c], help="serve /score, /sample, /healthz over HTTP (JSON; "
                                                                  "needs the [serve] extra)"))
    return ap


def _command(model, args):
    """(the JSON result, the exit code, its text as a function of it) of a command on the loaded model."""
    if args.command == "info":
        return model.info(), 0, lambda out: console.info_text(model)
    if args.command == "validate":
        out = validate(model, args.tolerance)
        return out, 0 if out["passed"] else 1, console.validate_text
    if args.command == "benchmark":
        out = benchmark(model, runs=args.runs, warmup=args.warmup, batch=args.batch, sample_runs=args.sample_runs,
                        raw=args.raw)
        return out, 0 if out["verdict"] == "pass" else 1, console.benchmark_text
    if args.command == "sample":
        out = console.sample_grid(model, args.n, args.out, seed=args.seed, temperature=args.temperature,
                                  top_k=args.top_k, cols=args.cols, scale=args.scale, tokens_out=args.tokens_out)
        return out, 0, lambda o: f"wrote {o['n']} samples to {o['png']}"
    if args.command == "score":
        named = read_inputs(model, args.images)
        names = [n for n, _ in named]
        if len(set(names)) < len(names):  # the JSON has one key per input
            twice = next(n for i, n in enumerate(names) if n in names[:i])
            raise ProjectableEdgeError(f"input '{twice}' is given more than once; pass each image once")
        bits = model.score(np.concatenate([t for _, t in named]))
        out = {"variant": model.variant, "bits_per_dim": dict(zip(names, map(float, bits))),
               "mean_bits_per_dim": float(bits.mean())}
        return out, 0, lambda o: console.score_text(names, bits, model.variant)
    return serve.command(model, args)


def run(args) -> int:
    if args.command == "schema":
        console.emit_json(json_schema())
        return 0
    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    if args.command == "tune":  # measures each candidate in its own process: nothing to load here
        if args.precision is not None:
            raise ProjectableEdgeError("tune picks the precision itself; pass --candidate SIZE/VARIANT to force one")
        if args.tuned is not None:
            raise ProjectableEdgeError("tune writes a tuned record (--record PATH) and reads it with --reuse; "
                                       "leave out --tuned")
        out = tune.tune(args.bundle, p99_ms=args.p99_ms, max_mb=args.max_mb, candidate=args.candidate, runs=args.runs,
                        warmup=args.warmup, providers=providers, backend=args.backend, public_key=args.public_key,
                        record=args.record, reuse=args.reuse,
                        log=None if args.json else lambda m: print(m, file=sys.stderr))
        code, text = 0 if out["fits"] else 1, tune.tune_text
    else:
        with load(args.bundle, precision=args.precision, providers=providers, backend=args.backend,
                  public_key=args.public_key, candidate=args.candidate, tuned=args.tuned or True) as model:
            out, code, text = _command(model, args)
    if text is None:  # the command printed its own output (serve: one line per event, JSON Lines with --json)
        return code
    if args.json:
        console.emit_json(out)
    else:
        print(console.printable(text(out)))
    return code


def main(argv: list[str] | None = None) -> int:
    """The CLI; argv None means this process is the command (python -m, or the console script), which then also
    takes SIGTERM as Ctrl-C and prints warnings in one line."""
    script = os.path.basename(sys.argv[0]) if argv is None else ""  # the wheel's console script, or python -m
    if argv is None:
        console.cli_signals()
    argv, verbose = console.take_verbose(sys.argv[1:] if argv is None else list(argv))
    json_errors = console.wants_json(argv)
    try:
        args = (build_parser(script) if script == "projectable-edge-runtime" else build_parser()).parse_args(argv)
    except ProjectableEdgeError as e:  # a usage error
        return console.fail(f"error: {e}", 2, json_errors)
    args.verbose = verbose or getattr(args, "verbose", False)
    return console.error_boundary(lambda: run(args), verbose=args.verbose, json_errors=json_errors)


if __name__ == "__main__":
    sys.exit(main())
