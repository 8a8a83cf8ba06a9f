"""Load test of `python -m projectable_edge_runtime serve`, side by side with the runtime in-process.

N concurrent clients for T seconds, each sending one image per request (POST /score, JSON tokens,
keep-alive connections) to a server started here on loopback, and the same N client threads calling
`Model.score` in-process on the same images for T seconds, in alternating slices (5 of each, order
rotated, so a change of load hits both); the same with 1 client; then, where ApacheBench is installed,
`ab -k` (HTTP/1.0 keep-alive) and plain `ab` (a new connection per request), R requests each with N
clients, against the same server. Every answer of the Python clients is checked against the in-process
score (a wrong or failed answer is an error); ab counts failed (connect, receive, exceptions) and
non-2xx answers. Reports requests, errors, throughput, latency percentiles (p50/p90/p99/max; ab's are
whole milliseconds) and the 1-minute load average before and after each phase, and the serving
overhead (HTTP p50 - in-process p50).

    python benchmarks/bench_serve.py BUNDLE [--clients 32] [--seconds 30] [--ab-requests 2000] [--json]

Bounded: loopback only, at most 256 clients and 600 s per phase. The Python clients are threads of
one process, so at high client counts part of their HTTP latency is the clients' own (GIL) work;
the server runs in its own process.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import projectable_edge_runtime as runtime
from timing import at_least, run_main

MAX_CLIENTS, MAX_SECONDS = 256, 600


def start_server(bundle: Path, precision: str | None, clients: int, workers: int) -> tuple[subprocess.Popen, str, int]:
    """The CLI server on 127.0.0.1 and a free port (its default connection limit, 512, holds every client)."""
    cmd = [sys.executable, "-m", "projectable_edge_runtime", "serve", str(bundle), "--host", "127.0.0.1",
           "--port", "0", "--workers", str(workers), "--json"]
    if precision:
        cmd += ["--precision", precision]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = p.stdout.readline()  # --json: the first JSON line is the "serving" event with the URL
    try:
        host, port = json.loads(line)["url"].removeprefix("http://").rsplit(":", 1)
    except (ValueError, KeyError):
        p.kill()
        raise SystemExit(f"server did not start: {line}{p.stderr.read()}") from None
    return p, host, int(port)


def stop_server(p: subprocess.Popen) -> dict:
    p.terminate()
    out, err = p.communicate(timeout=30)
    try:
        return json.loads(out.splitlines()[-1])  # the "stopped" event
    except (ValueError, IndexError):
        return {"stdout": out[-500:], "stderr": err[-2000:]}


def http_client(host: str, port: int, bodies: list[bytes], expected: np.ndarray, stop_at: float, k: int):
    """One keep-alive client: (latencies_ms, errors, first error)."""
    conn = http.client.HTTPConnection(host, port, timeout=30)
    lat, errors, first, n = [], 0, None, 0
    while time.perf_counter() < stop_at:
        i = (k * 7 + n) % len(bodies)
        n += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/score", body=bodies[i], headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            dt = (time.perf_counter() - t0) * 1e3
            ok = r.status == 200 and abs(json.loads(data)["bits_per_dim"][0] - expected[i]) < 1e-6
        except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
            ok, data = False, repr(e).encode()
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=30)
        if ok:
            lat.append(dt)
        else:
            errors += 1
            first = first or data[:300].decode("utf-8", "replace")
    conn.close()
    return lat, errors, first


def inproc_client(model, tokens: np.ndarray, expected: np.ndarray, stop_at: float, k: int):
    """The same work without HTTP: model.score on one image per call."""
    lat, errors, first, n = [], 0, None, 0
    while time.perf_counter() < stop_at:
        i = (k * 7 + n) % len(tokens)
        n += 1
        t0 = time.perf_counter()
        try:
            b = model.score(tokens[i:i + 1])[0]
            dt = (time.perf_counter() - t0) * 1e3
            ok = abs(b - expected[i]) < 1e-6
        except Exception as e:  # counted, never hidden
            ok, first = False, first or repr(e)
        if ok:
            lat.append(dt)
        else:
            errors += 1
    return lat, errors, first


def run_phases(fns: dict, clients: int, seconds: float, rounds: int = 5) -> list[dict]:
    """Run `clients` threads of each mode's fn(stop_at, k) for `seconds` in all, in `rounds` slices that alternate
    between the modes (order rotated), so load that changes hits every mode alike; per mode, pooled over its
    slices: latency percentiles and errors."""
    names, acc = list(fns), {n: {"lat": [], "errors": 0, "firsts": [], "wall": 0.0, "load": []} for n in fns}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            results: list = [None] * clients
            stop_at = time.perf_counter() + seconds / rounds

            def worker(k, fn=fns[name], stop_at=stop_at):
                results[k] = fn(stop_at, k)

            threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
            a, load0, t0 = acc[name], os.getloadavg()[0], time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(seconds + 120)
            finished = [r for r in results if r is not None]
            a["wall"] += time.perf_counter() - t0
            a["lat"] += [x for r in finished for x in r[0]]
            a["errors"] += sum(r[1] for r in finished) + (clients - len(finished))
            a["firsts"] += [r[2] for r in finished if r[2]]
            a["load"] += [load0, os.getloadavg()[0]]
    out = []
    for name, a in acc.items():
        lat = np.array(a["lat"])
        pct = (lambda q: float(np.percentile(lat, q))) if lat.size else (lambda q: float("nan"))
        out.append({"mode": name, "clients": clients, "seconds": round(a["wall"], 2), "requests": int(lat.size) +
                    a["errors"], "ok": int(lat.size), "errors": int(a["errors"]),
                    "first_error": a["firsts"][0] if a["firsts"] else None, "throughput_per_s": lat.size / a["wall"],
                    "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
                    "max_ms": float(lat.max()) if lat.size else float("nan"), "load": [a["load"][0], a["load"][-1]]})
    return out


def run_ab(url: str, body: bytes, requests: int, clients: int, keep_alive: bool) -> dict:
    """ApacheBench against POST /score: -l (answers differ in length: latency_ms), -k for keep-alive."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        cmd = ["ab", "-n", str(requests), "-c", str(clients), "-s", "60", "-l", "-p", f.name,
               "-T", "application/json", *(["-k"] if keep_alive else []), url + "/score"]
        load0 = os.getloadavg()[0]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=MAX_SECONDS)
    out = proc.stdout

    def num(label: str, default: float = float("nan")) -> float:  # "Label:   123.4 [...]" or " 99%   12"
        m = re.search(rf"^\s*{re.escape(label)}:?\s+([\d.]+)", out, re.M)
        return float(m[1]) if m else default

    complete, failed, non2xx = num("Complete requests", 0), num("Failed requests", 0), num("Non-2xx responses", 0)
    errors = int(failed + non2xx + (requests - complete) + (proc.returncode != 0))
    return {"mode": "ab -k" if keep_alive else "ab", "clients": clients, "seconds": num("Time taken for tests"),
            "requests": requests, "ok": int(complete - failed - non2xx), "errors": errors,
            "first_error": (proc.stderr or out)[-300:] if errors else None,
            "throughput_per_s": num("Requests per second"), "p50_ms": num("50%"), "p90_ms": num("90%"),
            "p99_ms": num("99%"), "max_ms": num("100%"), "load": [load0, os.getloadavg()[0]],
            "command": " ".join(cmd).replace(f.name, "BODY.json").replace(url, "URL")}


def goldens(bundle: Path) -> np.ndarray:
    with np.load(bundle / "goldens.npz", allow_pickle=False) as z:
        return z["tokens"].astype(np.int64)


def measure(bundle: Path, clients: int, seconds: float, precision: str | None, workers: int,
            ab_requests: int) -> dict:
    with runtime.load(bundle, precision=precision) as model:
        tokens = goldens(bundle)
        expected = model.score(tokens)
        bodies = [json.dumps({"tokens": tokens[i:i + 1].tolist()}).encode() for i in range(len(tokens))]
        proc, host, port = start_server(bundle, precision, clients, workers)
        try:
            http_client(host, port, bodies, expected, time.perf_counter() + 1.0, 0)  # warm-up
            model.score(tokens)  # warm-up
            modes = {"http": lambda s, k: http_client(host, port, bodies, expected, s, k),
                     "in-process": lambda s, k: inproc_client(model, tokens, expected, s, k)}
            phases = run_phases(modes, clients, seconds) + run_phases(modes, 1, min(seconds, 5.0))
            if ab_requests and shutil.which("ab"):
                phases += [run_ab(f"http://{host}:{port}", bodies[0], ab_requests, clients, keep_alive)
                           for keep_alive in (True, False)]
        finally:
            server = stop_server(proc)
        variant = model.variant
    by = {(p["mode"], p["clients"]): p for p in phases}
    return {"bundle": str(bundle), "variant": variant, "task": model.task.get("name"), "server_workers": workers,
            "cpu_count": os.cpu_count(), "phases": phases, "server": server,
            "overhead_p50_ms": {f"{c} clients": by[("http", c)]["p50_ms"] - by[("in-process", c)]["p50_ms"]
                                for c in sorted({clients, 1})},
            "ab": "ran" if any(p["mode"].startswith("ab") for p in phases) else
                  ("not installed (apt-get install apache2-utils)" if ab_requests else "off (--ab-requests 0)"),
            "passed": all(p["errors"] == 0 for p in phases)}


def table(out: dict) -> str:
    rows = [("mode", "clients", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "load avg")]
    for p in out["phases"]:
        rows.append((p["mode"], p["clients"], p["requests"], p["errors"], f"{p['throughput_per_s']:.1f}",
                     *(f"{p[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")),
                     "{:.1f} -> {:.1f}".format(*p["load"])))
    w = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [f"bench_serve: task {out['task']} ({out['variant']}), server workers {out['server_workers']}, "
             f"{out['cpu_count']} CPUs, one image per request"]
    lines += ["| " + " | ".join(str(c).ljust(x) for c, x in zip(r, w)) + " |" for r in rows[:1]]
    lines += ["|" + "|".join("-" * (x + 2) for x in w) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(x) for c, x in zip(r, w)) + " |" for r in rows[1:]]
    lines += [f"HTTP overhead at p50: " + ", ".join(f"{k}: {v:+.3f} ms" for k, v in out["overhead_p50_ms"].items())]
    lines += [f"ab: {out['ab']}"] + [f"  {p['mode']}: {p['command']}" for p in out["phases"] if "command" in p]
    for p in out["phases"]:
        if p["first_error"]:
            lines.append(f"first error ({p['mode']}, {p['clients']} clients): {p['first_error']}")
    lines.append("PASS: zero failed valid requests" if out["passed"] else "FAIL: some valid requests failed")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--precision", help="graph variant (default: the bundle's selected one)")
    ap.add_argument("--workers", type=at_least(1), default=4, help="the server's concurrent model calls")
    ap.add_argument("--ab-requests", type=at_least(0), default=2000, help="requests per ab run (0: no ab)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        ap.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    out = measure(args.bundle.resolve(), args.clients, args.seconds, args.precision, args.workers, args.ab_requests)
    print(json.dumps(out, indent=2) if args.json else table(out))
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    run_main(main, json_stdout=True)
