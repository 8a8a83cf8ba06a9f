"""`python -m runtime {info,validate,benchmark,sample,score} BUNDLE ...` — the on-device CLI.

Stdlib argparse only (the device has no typer/rich). Exit codes: 0 ok, 1 a check failed
(validate / benchmark verdict), 2 an error (printed as one line; traceback with --verbose).
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback

import numpy as np

from devices.errors import ProjectableEdgeError


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("bundle", help="bundle directory (bundles/<task>__<target>)")
    p.add_argument("--precision",
                   help="graph variant, e.g. fp32, fp16, int8 (default: the one selected for the target)")
    p.add_argument("--providers", help="comma-separated onnxruntime execution providers (default: the target's)")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "tensorrt"))
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="show tracebacks")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m runtime", description="Torch-free projectable-edge runtime.")
    sub = ap.add_subparsers(dest="command", required=True)
    c = _common()
    sub.add_parser("info", parents=[c], help="show what the bundle holds and which backend runs it")
    v = sub.add_parser("validate", parents=[c], help="re-measure bits/dim on the bundle's held-out images")
    v.add_argument("--tolerance", type=float, help="bits/dim tolerance (default: the manifest's)")
    b = sub.add_parser("benchmark", parents=[c], help="latency percentiles, throughput, memory, budget verdict")
    b.add_argument("--runs", type=int, default=100)
    b.add_argument("--warmup", type=int, default=10)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--sample-runs", type=int, default=None)
    b.add_argument("--raw", action="store_true", help="include every timing (times_ms) in the JSON")
    s = sub.add_parser("sample", parents=[c], help="generate images and write a PNG grid")
    s.add_argument("-n", type=int, default=16)
    s.add_argument("--out", default="samples.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--cols", type=int, default=None)
    s.add_argument("--scale", type=int, default=4)
    s.add_argument("--tokens-out", help="also save the sampled tokens as .npy")
    sc = sub.add_parser("score", parents=[c], help="bits/dim of image files (or .npy arrays of images/tokens)")
    sc.add_argument("images", nargs="+")
    return ap


def _read_inputs(model, paths: list[str]) -> tuple[list[str], np.ndarray]:
    names, tokens = [], []
    for p in paths:
        if p.endswith(".npy"):
            try:
                a = np.load(p, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ProjectableEdgeError(f"cannot read '{p}' as a numpy array ({e}); pass a .npy file") from None
            t = model.to_tokens(a)
            names += [f"{p}[{i}]" for i in range(len(t))] if len(t) > 1 else [p]
            tokens.append(t)
        else:
            try:
                imgs = model.tokenizer.load_images([p])
            except ImportError:
                raise ProjectableEdgeError("reading image files needs Pillow; `pip install pillow`, or pass "
                                           ".npy arrays") from None
            names.append(p)
            tokens.append(model.tokenizer.encode(imgs))
    return names, np.concatenate(tokens)


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def print_benchmark(out: dict) -> None:
    """The human-readable benchmark table (shared with `projectable-edge benchmark`)."""
    print(f"benchmark {out['variant']} on {', '.join(out['providers'])} ({out['backend']}: "
          f"{out['backend_reason']}); load {out['load_time_ms']:.1f} ms")
    rows = [("case", "p50 ms", "p90 ms", "p99 ms", "mean", "std", "p99/p50", "items/s")]
    for k, r in out["results"].items():
        rows.append((k, *(_fmt(r[f]) for f in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms",
                                                "spread_p99_over_p50", "throughput_per_s"))))
    _print_table(rows)
    if out.get("peak_rss_mb") is not None:
        print(f"  peak memory (RSS): {out['peak_rss_mb']:.1f} MB")
    for c in out["checks"]:
        print(f"  {c['name']}: {c['value']:.2f} (budget {c['budget']}) {'ok' if c['passed'] else 'OVER'}")
    print(f"verdict: {out['verdict'].upper()}" + (f"  [{out['host']['note']}]" if out["host"]["note"] else ""))


def run(args) -> int:
    from runtime.bundle import load  # imported here so `--help` stays instant

    providers = [p.strip() for p in args.providers.split(",") if p.strip()] if args.providers else None
    model = load(args.bundle, precision=args.precision, providers=providers, backend=args.backend)
    if args.command == "info":
        out, code = model.info(), 0
        if not args.json:
            b = out["backend"]
            print(f"{model!r}\n  variants: {', '.join(out['variants'])}\n  backend reason: {b['reason']}")
            if b["providers_missing"]:
                print(f"  providers not in this onnxruntime build: {', '.join(b['providers_missing'])}")
            return 0
    elif args.command == "validate":
        from runtime.validate import validate
        out = validate(model, args.tolerance)
        code = 0 if out["passed"] else 1
        if not args.json:
            print(f"validate {out['variant']} ({out['backend']}, {', '.join(out['providers'])}): "
                  f"{out['verdict'].upper()}")
            _print_table([("bits/dim", "expected", "delta", "tolerance", "images"),
                          tuple(_fmt(out[k]) for k in ("bits", "expected_bits", "delta", "tolerance", "n_images"))])
            print(f"  expected = {out['compared_with']}")
            return code
    elif args.command == "benchmark":
        from runtime.benchmark import benchmark
        out = benchmark(model, runs=args.runs, warmup=args.warmup, batch=args.batch, sample_runs=args.sample_runs,
                        raw=args.raw)
        code = 0 if out["verdict"] == "pass" else 1
        if not args.json:
            print_benchmark(out)
            return code
    elif args.command == "sample":
        from runtime.png import image_grid, write_png
        tokens = model.sample(args.n, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        imgs = model.decode_images(tokens)
        cols = args.cols or max(1, int(np.ceil(np.sqrt(len(imgs)))))
        path = write_png(args.out, image_grid(imgs, cols=cols, pad=1, scale=args.scale))
        if args.tokens_out:
            np.save(args.tokens_out, tokens)
        out, code = {"png": str(path), "n": int(len(tokens)), "seed": args.seed, "variant": model.variant,
                     "backend": model.backend["backend"], "providers": model.backend["providers"],
                     "tokens_out": args.tokens_out}, 0
        if not args.json:
            print(f"wrote {len(tokens)} samples to {path}")
            return 0
    else:  # score
        names, tokens = _read_inputs(model, args.images)
        bits = model.score(tokens)
        out = {"variant": model.variant, "bits_per_dim": dict(zip(names, map(float, bits))),
               "mean_bits_per_dim": float(bits.mean())}
        code = 0
        if not args.json:
            _print_table([("input", "bits/dim")] + [(n, f"{b:.4f}") for n, b in zip(names, bits)])
            print(f"mean {bits.mean():.4f} bits/dim ({model.variant})")
            return 0
    print(json.dumps(out, indent=2, default=str))
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ProjectableEdgeError as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # an unexpected failure still gets one readable line
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (rerun with --verbose for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
