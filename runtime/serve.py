"""`python -m projectable_edge_runtime serve BUNDLE`: one model behind a small HTTP/JSON endpoint.

Stdlib only (`http.server`), so a device needs nothing beyond the runtime wheel:

    GET  /healthz  -> {"status": "ok", "task", "variant", "image_shape", "seq_len", "limits", ...}
    POST /score    {"images": [[[0..255]]]} or {"tokens": [[0..V-1]]}  -> {"bits_per_dim": [...], ...}
                   (or a .npy body with Content-Type application/x-npy: uint8 images or int tokens)
    POST /sample   {"n": 4, "seed": 0, "temperature": 1.0, "top_k": null} -> {"tokens", "images", ...}

Bounded everywhere, so a busy or hostile client cannot take the device down: a fixed pool of
connection threads (a connection beyond it gets 503 at once), a fixed number of concurrent model
calls, a request-body limit, a per-request image limit and an idle timeout. Anything wrong with a
request (route, method, JSON, shape, dtype, size) is a 4xx with a JSON `{"error": ...}` naming the
problem and the fix; 5xx is kept for the server's own faults, and the server keeps serving.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import urlsplit

import numpy as np

from .devices.errors import ProjectableEdgeError

JSON_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")  # curl -d sends the last
NPY_TYPES = ("application/x-npy", "application/octet-stream")


@dataclass(frozen=True)
class Limits:
    """What one server accepts; defaults suit a small device."""
    max_body_bytes: int = 1 << 20  # a request body larger than this: 413
    max_batch: int = 64            # images per /score request
    max_sample: int = 16           # images per /sample request
    workers: int = 4               # concurrent model calls; more requests wait their turn
    max_connections: int = 64      # open connections served at once; one more gets 503
    idle_timeout_s: float = 15.0   # a connection silent this long is closed

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not value > 0:
                raise ProjectableEdgeError(f"serve limit {name} must be > 0, got {value!r}")


class RequestError(Exception):
    """A bad request: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = int(status)


# ----------------------------------------------------------------------------- request logic (no HTTP)

def _int_array(value: Any, field: str) -> np.ndarray:
    """A JSON nested list of integers as an int64 array, or a 400 naming what is wrong with it."""
    if not isinstance(value, list):
        raise RequestError(400, f"'{field}' must be a nested list of integers, got {type(value).__name__}")
    try:
        a = np.array(value)
    except (ValueError, OverflowError, TypeError, RecursionError):
        raise RequestError(400, f"'{field}' is ragged: every row must have the same length") from None
    if a.size == 0:
        raise RequestError(400, f"'{field}' is empty; send at least one image")
    if a.dtype == bool or a.dtype.kind not in "iu":
        kind = {"b": "booleans", "f": "floating-point numbers", "U": "strings", "O": "mixed or nested values"}
        raise RequestError(400, f"'{field}' must hold integers, got {kind.get(a.dtype.kind, a.dtype.name)} "
                                "(wrong dtype); send whole numbers")
    if a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
        raise RequestError(400, f"'{field}' holds integers too large for int64 (wrong dtype)")
    return a.astype(np.int64)


class ModelService:
    """Turns request bodies into model calls and JSON answers; the HTTP layer only moves bytes."""

    def __init__(self, model, limits: Limits = Limits()):
        self.model = model
        self.limits = limits
        self._gate = threading.BoundedSemaphore(limits.workers)
        self._lock = threading.Lock()
        self.started = time.time()
        self.served = 0

    def count(self) -> None:
        with self._lock:
            self.served += 1

    def health(self) -> dict:
        m = self.model
        return {"status": "ok", "task": m.task, "variant": m.variant, "backend": m.backend["backend"],
                "providers": m.backend["providers"], "image_shape": list(m.tokenizer.image_shape),
                "seq_len": m.seq_len, "vocab_size": m.tokenizer.vocab_size, "limits": asdict(self.limits),
                "uptime_s": round(time.time() - self.started, 3), "requests_served": self.served}

    def _tokens(self, images: np.ndarray | None, tokens: np.ndarray | None) -> np.ndarray:
        """Images (0..255) or tokens to validated tokens; shape/range errors name the expected shape."""
        if images is not None:
            if images.min() < 0 or images.max() > 255:
                raise RequestError(400, f"'images' values must be 0..255, got {images.min()}..{images.max()}")
            x, want = images.astype(np.uint8), self.model.tokenizer.image_shape
            if x.ndim != len(want) + 1:
                hint = ": wrap a single image in a list" if x.ndim == len(want) else ""
                raise RequestError(400, f"'images' has shape {list(x.shape)}{hint} (expected "
                                        f"[N, {', '.join(map(str, want))}])")
        else:
            x = tokens
            if x.ndim != 2:
                raise RequestError(400, f"'tokens' has shape {list(x.shape)}, expected [N, {self.model.seq_len}]")
        if len(x) > self.limits.max_batch:
            raise RequestError(413, f"{len(x)} images in one request; at most {self.limits.max_batch} "
                                    "(split the batch)")
        try:
            return self.model.to_tokens(x)
        except ProjectableEdgeError as e:
            raise RequestError(400, str(e)) from None

    def score_json(self, body: Any) -> dict:
        body = _object(body, {"images", "tokens"})
        if ("images" in body) == ("tokens" in body):
            raise RequestError(400, "send exactly one of 'images' (uint8 [N, H, W]) or 'tokens' (int [N, T])")
        if "images" in body:
            return self.score(self._tokens(_int_array(body["images"], "images"), None))
        return self.score(self._tokens(None, _int_array(body["tokens"], "tokens")))

    def score_npy(self, data: bytes) -> dict:
        try:
            a = np.load(io.BytesIO(data), allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise RequestError(400, f"body is not a .npy array ({e}); send np.save output") from None
        if a.size == 0:
            raise RequestError(400, "the .npy array is empty; send at least one image")
        if a.dtype == np.uint8:
            return self.score(self._tokens(a, None))
        if a.dtype.kind in "iu" and a.dtype != bool:
            return self.score(self._tokens(None, a.astype(np.int64)))
        raise RequestError(400, f".npy dtype {a.dtype} is not accepted (wrong dtype); send uint8 images or "
                                "integer tokens")

    def score(self, tokens: np.ndarray) -> dict:
        t0 = time.perf_counter()
        with self._gate:
            bits = self.model.score(tokens)
        return {"bits_per_dim": [float(b) for b in bits], "n": int(len(bits)), "variant": self.model.variant,
                "task": self.model.task.get("name"), "latency_ms": (time.perf_counter() - t0) * 1e3}

    def sample_json(self, body: Any) -> dict:
        body = _object(body, {"n", "seed", "temperature", "top_k"})
        n = _number(body, "n", int, 1)
        if not 1 <= n <= self.limits.max_sample:
            raise RequestError(400 if n < 1 else 413, f"'n' must be 1..{self.limits.max_sample}, got {n}")
        seed, temperature = _number(body, "seed", int, 0), _number(body, "temperature", float, 1.0)
        top_k = None if body.get("top_k") is None else _number(body, "top_k", int, None)
        t0 = time.perf_counter()
        try:
            with self._gate:
                tokens = self.model.sample(n, temperature=temperature, top_k=top_k, seed=seed)
        except ProjectableEdgeError as e:
            raise RequestError(400, str(e)) from None
        return {"tokens": tokens.tolist(), "images": self.model.decode_images(tokens).tolist(), "n": n,
                "seed": seed, "variant": self.model.variant, "latency_ms": (time.perf_counter() - t0) * 1e3}


def _object(body: Any, allowed: set[str]) -> dict:
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object with fields {sorted(allowed)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; accepted: {sorted(allowed)}")
    return body


def _number(body: dict, field: str, kind: type, default):
    v = body.get(field, default)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or isinstance(v, int))
    if not ok:
        raise RequestError(400, f"'{field}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


# ----------------------------------------------------------------------------- HTTP layer

class Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's ModelService; every answer, error or not, is JSON."""

    protocol_version = "HTTP/1.1"  # keep-alive: a client reuses its connection
    default_request_version = "HTTP/1.0"  # a malformed request line still gets a status line and JSON
    disable_nagle_algorithm = True  # small answers go out at once, not after a delayed ACK (~40 ms)
    wbufsize = 1 << 16  # status, headers and body leave in one send (handle_one_request flushes)
    server_version = "projectable-edge-runtime"
    ROUTES = {("GET", "/healthz"), ("POST", "/score"), ("POST", "/sample")}

    def setup(self) -> None:
        self.timeout = self.server.limits.idle_timeout_s
        super().setup()

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any other method: 405, not the base class's 501
            return self._dispatch
        raise AttributeError(name)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        path, self._allow = urlsplit(self.path).path, None
        try:
            data = self._body()  # read first, whatever the route: the connection stays in step
            status, out = 200, self._answer(self.command, path, data)
        except RequestError as e:
            status, out = e.status, {"error": str(e), "status": e.status}
        except Exception as e:  # the server's own fault: 500, logged, and the server keeps serving
            traceback.print_exc(file=sys.stderr)
            status, out = 500, {"error": f"internal error: {type(e).__name__}: {e}", "status": 500}
        self._send(status, out)

    def _answer(self, method: str, path: str, data: bytes) -> dict:
        service: ModelService = self.server.service
        if (method, path) not in self.ROUTES:
            allowed = sorted(m for m, p in self.ROUTES if p == path)
            if allowed:
                self._allow = ", ".join(allowed)
                raise RequestError(405, f"{method} {path} is not supported; use {self._allow} {path}")
            raise RequestError(404, f"no route {path}; routes: GET /healthz, POST /score, POST /sample")
        if method == "GET":
            service.count()
            return service.health()
        if not data:
            raise RequestError(400, "empty body; send a JSON object (GET /healthz shows the image shape)")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if path == "/score" and ctype in NPY_TYPES:
            out = service.score_npy(data)
        elif ctype in JSON_TYPES:
            body = _parse_json(data)
            out = service.score_json(body) if path == "/score" else service.sample_json(body)
        else:
            raise RequestError(415, f"Content-Type {ctype!r} is not accepted; send application/json"
                                    + (" or application/x-npy" if path == "/score" else ""))
        service.count()
        return out

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError(411, "chunked bodies are not accepted; send a Content-Length")
        text = self.headers.get("Content-Length")
        if text is None:
            return 0
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {text!r}")
        return n

    def _body(self) -> bytes:
        """The request body (b"" when none), bounded by the limit; a refused body closes the connection."""
        n, limit = self._content_length(), self.server.limits.max_body_bytes
        if n > limit:
            if n <= 4 * limit:  # read it away: the client gets its 413 rather than a reset connection
                self._drain(n)
            else:
                self.close_connection = True  # the body stays unread: this connection cannot be reused
            raise RequestError(413, f"body of {n} bytes is larger than the limit of {limit}; send fewer "
                                    "images per request")
        data = self._read(n) if n else b""
        if len(data) < n:
            self.close_connection = True
            raise RequestError(400, f"body ended after {len(data)} of {n} bytes")
        return data

    def _read(self, n: int) -> bytes:
        """rfile.read, with a client that stalls past the idle timeout answered 408, not a 500."""
        try:
            return self.rfile.read(n)
        except (TimeoutError, OSError):
            self.close_connection = True
            raise RequestError(408, f"the request body did not arrive within {self.server.limits.idle_timeout_s} s; "
                                    "send it at once") from None

    def _drain(self, n: int) -> None:
        while n > 0:
            chunk = self._read(min(n, 1 << 16))
            if not chunk:
                self.close_connection = True
                return
            n -= len(chunk)

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405 and getattr(self, "_allow", None):
            self.send_header("Allow", self._allow)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's protocol errors (bad request line, headers, version), as JSON 4xx."""
        code = {501: 405, 505: 400}.get(int(code), int(code))
        self.close_connection = True
        try:
            self._send(code, {"error": message or HTTPStatus(code).phrase, "status": code})
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:
        if self.server.access_log:
            sys.stderr.write(f"{self.address_string()} - {format % args}\n")


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise RequestError(400, f"body is not valid JSON ({e})") from None
    except RecursionError:
        raise RequestError(400, "body is not valid JSON (nested too deeply)") from None


class ModelServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose connection threads come from a fixed pool; overflow gets 503 at once."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, service: ModelService, access_log: bool = False):
        self.service = service
        self.limits = service.limits
        self.access_log = access_log
        self._slots = threading.BoundedSemaphore(service.limits.max_connections)
        self._pool = ThreadPoolExecutor(max_workers=service.limits.max_connections,
                                        thread_name_prefix="pe-serve")
        self._open: set = set()
        self._open_lock = threading.Lock()
        # the listen backlog holds a burst of new connections (socketserver's default of 5 resets some)
        self.request_queue_size = max(128, service.limits.max_connections)
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            _refuse_busy(request, self.limits.max_connections)
            self.shutdown_request(request)
            return
        with self._open_lock:
            self._open.add(request)
        self._pool.submit(self._serve_one, request, client_address)

    def _serve_one(self, request, client_address) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(request)
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def server_close(self) -> None:
        """Stop accepting, drop open keep-alive connections, let the pool's threads end."""
        super().server_close()
        with self._open_lock:
            for s in list(self._open):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.shutdown(wait=True, cancel_futures=True)


def _refuse_busy(request, limit: int) -> None:
    body = json.dumps({"error": f"server busy: {limit} connections open; retry shortly", "status": 503}).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Retry-After: 1\r\nConnection: close\r\n\r\n").encode()
    try:
        request.sendall(head + body)
    except OSError:
        pass


def make_server(model, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
                access_log: bool = False) -> ModelServer:
    """A bound (not yet serving) server for a loaded model; port 0 picks a free port (see `.url`)."""
    try:
        return ModelServer((host, port), ModelService(model, limits), access_log=access_log)
    except OSError as e:
        raise ProjectableEdgeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port "
                                   "(0 picks a free one) or --host") from None


def serve(model, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          access_log: bool = False, say: Callable[[str], None] = print) -> dict:
    """Serve until Ctrl-C or SIGTERM; returns what was served."""
    server = make_server(model, host, port, limits, access_log)
    stop = lambda *_: threading.Thread(target=server.shutdown, daemon=True).start()  # noqa: E731
    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    say(f"serving task {model.task.get('name')} ({model.variant}) on {server.url} "
        f"(GET /healthz, POST /score, POST /sample; pid {os.getpid()}); Ctrl-C stops")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return {"url": server.url, "requests_served": server.service.served,
            "uptime_s": time.time() - server.service.started}


# ----------------------------------------------------------------------------- the CLI's `serve` command

def add_arguments(p) -> None:
    """`serve`'s own options (the bundle, --precision, --json, ... come from the CLI's common parser)."""
    d = Limits()
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    p.add_argument("--workers", type=int, default=d.workers, help="concurrent model calls")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="connections served at once; one more gets 503")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest request body")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="most images per /score request")
    p.add_argument("--max-sample", type=int, default=d.max_sample, help="most images per /sample request")
    p.add_argument("--idle-timeout", type=float, default=d.idle_timeout_s, help="seconds before an idle connection closes")
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")


def command(model, args):
    """Run `serve` for the CLI: (result, exit code, text formatter)."""
    limits = Limits(max_body_bytes=args.max_body_bytes, max_batch=args.max_batch, max_sample=args.max_sample,
                    workers=args.workers, max_connections=args.max_connections, idle_timeout_s=args.idle_timeout)
    if not 0 <= args.port <= 65535:
        raise ProjectableEdgeError(f"--port must be 0..65535, got {args.port}")
    out = serve(model, args.host, args.port, limits, access_log=args.access_log)
    return out, 0, lambda o: f"stopped; served {o['requests_served']} requests in {o['uptime_s']:.1f} s"
