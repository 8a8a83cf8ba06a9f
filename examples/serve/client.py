"""A client for `python -m projectable_edge_runtime serve BUNDLE`: stdlib + numpy, no runtime needed.

    python examples/serve/client.py http://127.0.0.1:8000 healthz
    python examples/serve/client.py http://127.0.0.1:8000 score images.npy      # uint8 [N,H,W] or tokens [N,T]
    python examples/serve/client.py http://127.0.0.1:8000 sample -n 4 --seed 0
    python examples/serve/client.py http://127.0.0.1:8000 roundtrip images.npy  # the device check: every
                                                                                 # route, good and bad input
Prints JSON; exits 1 when the server answers with an error (roundtrip: when any check fails).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.error
import urllib.request

import numpy as np


def call(url: str, method: str, path: str, body: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    """One request; (HTTP status, JSON answer) for success and error answers alike."""
    req = urllib.request.Request(url.rstrip("/") + path, data=body, method=method,
                                 headers={"Content-Type": content_type} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def score(url: str, array: np.ndarray) -> tuple[int, dict]:
    return call(url, "POST", "/score", npy_bytes(array), "application/x-npy")


def roundtrip(url: str, array: np.ndarray) -> list[tuple[str, bool, str]]:
    """Every route with valid input, then malformed requests (each must be a JSON 4xx), then health again."""
    checks = []
    status, h = call(url, "GET", "/healthz")
    checks.append(("GET /healthz", status == 200 and h.get("status") == "ok", f"{status} {h.get('variant')}"))
    n = min(len(array), int(h.get("limits", {}).get("max_batch", 8)))
    status, s = score(url, array[:n])
    bits = s.get("bits_per_dim", [])
    ok = status == 200 and len(bits) == n and all(np.isfinite(bits))
    checks.append(("POST /score (.npy)", ok, f"{status} mean {np.mean(bits) if bits else float('nan'):.5f} bits/dim"))
    status, j = call(url, "POST", "/score", json.dumps({"tokens" if array.ndim == 2 else "images":
                                                        array[:n].tolist()}).encode())
    same = status == 200 and np.allclose(j.get("bits_per_dim", []), bits, rtol=0, atol=1e-9)
    checks.append(("POST /score (JSON) = .npy", same, f"{status}"))
    status, smp = call(url, "POST", "/sample", json.dumps({"n": 2, "seed": 0}).encode())
    shape = list(np.array(smp.get("images", [])).shape)
    checks.append(("POST /sample", status == 200 and shape == [2, *h.get("image_shape", [])], f"{status} {shape}"))
    bad = [("unknown route", "GET", "/nope", None), ("bad JSON", "POST", "/score", b"{oops"),
           ("wrong shape", "POST", "/score", json.dumps({"tokens": [[0, 1, 2]]}).encode()),
           ("wrong dtype", "POST", "/score", json.dumps({"tokens": [[0.5] * int(h.get("seq_len", 1))]}).encode()),
           ("too large", "POST", "/score", b"[" + b" " * int(h.get("limits", {}).get("max_body_bytes", 1)) + b"]")]
    for name, method, path, body in bad:
        status, e = call(url, method, path, body)
        checks.append((f"{name} -> 4xx JSON", 400 <= status < 500 and "error" in e, f"{status} {e.get('error', '')[:60]}"))
    status, h = call(url, "GET", "/healthz")
    checks.append(("still serving", status == 200, f"{status} served {h.get('requests_served')}"))
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("healthz")
    s = sub.add_parser("score")
    s.add_argument("npy", help=".npy of uint8 images [N, H, W] or int tokens [N, T]")
    p = sub.add_parser("sample")
    p.add_argument("-n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("roundtrip")
    r.add_argument("npy")
    args = ap.parse_args(argv)
    try:
        if args.command == "roundtrip":
            checks = roundtrip(args.url, np.load(args.npy, allow_pickle=False))
            for name, ok, note in checks:
                print(f"  {'ok  ' if ok else 'FAIL'} {name:28s} {note}")
            return 0 if all(ok for _, ok, _ in checks) else 1
        if args.command == "healthz":
            status, out = call(args.url, "GET", "/healthz")
        elif args.command == "score":
            status, out = score(args.url, np.load(args.npy, allow_pickle=False))
        else:
            status, out = call(args.url, "POST", "/sample", json.dumps({"n": args.n, "seed": args.seed}).encode())
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
