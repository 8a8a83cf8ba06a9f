"""`python -m projectable_edge_runtime serve BUNDLE`: one model behind GET /healthz, POST /score and POST /sample.
HTTP is waitress's (the `[serve]` extra, imported only when a server is made); here is the request logic.
Anything wrong with a request is a 4xx with a JSON `{"error", "status"}` naming the problem and the fix."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, fields
from http import HTTPStatus

import numpy as np

from ..devices.errors import ProjectableEdgeError
from ..graphs.tokenizer import validate_tokens
from .console import one_line
from .inputs import read_npy

SERVE_REQUIRES = "waitress>=3.0.1,<4"  # the `[serve]` extra (the JSON errors hook waitress 3's channel classes)
JSON_TYPES = ("application/json", "", "text/plain", "application/x-www-form-urlencoded")  # curl -d sends the last
NPY_TYPES = ("application/x-npy", "application/octet-stream")
ROUTES = {("GET", "/healthz"), ("POST", "/score"), ("POST", "/sample")}
TOO_LARGE = "body larger than the limit of {} bytes; send fewer images per request"


@dataclass(frozen=True)
class Limits:
    """What one server accepts (each field is a CLI option); defaults suit a small device."""
    max_body_bytes: int = field(default=1 << 20, metadata={"help": "largest request body, chunked too (413)"})
    max_batch: int = field(default=64, metadata={"help": "most images per /score request (413)"})
    max_sample: int = field(default=16, metadata={"help": "most images per /sample request (413)"})
    workers: int = field(default=4, metadata={"help": "requests (so model calls) handled at once; more wait"})
    max_connections: int = field(default=512, metadata={"help": "open client connections; more wait to be accepted"})
    idle_timeout_s: int = field(default=15, metadata={"help": "seconds a connection may be silent, take to send a "
                                                              "request, or leave its answers unread"})

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if type(value) is not int or value <= 0:
                raise ProjectableEdgeError(f"serve limit {name} must be a whole number > 0, got {value!r}")


class RequestError(Exception):
    """RequestError(HTTP status, message for the client[, extra headers])."""


def other_major(version: str) -> bool:
    """A request line's HTTP version of another major than 1 (a 505); none at all is served as HTTP/1.0."""
    return bool(version) and not version.startswith("1.")


def _json(data: bytes, allowed: set[str]) -> dict:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise RequestError(400, f"body is not valid JSON ({'nested too deeply' if type(e) is RecursionError else e})")
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object with fields {sorted(allowed)}")
    if unknown := sorted(set(body) - allowed):
        raise RequestError(400, f"unknown field(s) {unknown}; accepted: {sorted(allowed)}")
    return body


def _number(body: dict, name: str, kind: type, default):
    v = body.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or (kind is int and not isinstance(v, int)):
        raise RequestError(400, f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    return kind(v)


class ModelServer:
    """One loaded model as a WSGI application, on a bound socket (port 0 picks a free one: see `.url`);
    `run()` serves it with waitress until `stop()` (from any thread) or Ctrl-C."""

    def __init__(self, model, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
                 access_log: bool = False, verbose: bool = False):
        try:
            from waitress import channel, parser, server, task, wasyncore
        except ImportError:
            raise ProjectableEdgeError("`serve` needs waitress: pip install 'projectable-edge-runtime[serve]' "
                                       f"(or '{SERVE_REQUIRES}')") from None
        with contextlib.suppress(ImportError):  # (no `resource` on Windows)
            import resource  # each client is an open file: past the limit, waitress's accept() fails in a busy loop
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            need, unlimited = limits.max_connections + 64, resource.RLIM_INFINITY  # + the bundle's, the pipe's, ...
            if soft != unlimited and soft < need:
                try:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
                except (ValueError, OSError):
                    raise ProjectableEdgeError(
                        f"serve limit max_connections {limits.max_connections} needs {need} open files, but this "
                        f"process may open {soft} (ulimit -n); lower --max-connections or raise `ulimit -n`") from None
        try:
            family, *_, addr = socket.getaddrinfo(host, port)[0]
            sock = socket.create_server((host, port), family=family,  # `::` takes IPv4 clients too, as 0.0.0.0 would
                                        dualstack_ipv6=addr[0] == "::" and socket.has_dualstack_ipv6())
        except (OSError, OverflowError) as e:
            raise ProjectableEdgeError(f"cannot listen on {host}:{port} ({getattr(e, 'strerror', None) or e}); "
                                       "choose another --port (0 picks a free one) or --host") from None
        self.model, self.limits, self.access_log, self.verbose, self._map = model, limits, access_log, verbose, {}
        self._lock, self.started, self.served, self.ended = threading.Lock(), time.time(), 0, False
        self._close_all = lambda: wasyncore.close_all(self._map)
        draining = self._draining = threading.Event()  # set by Ctrl-C / SIGTERM: answer what was read, read no more

        class JsonErrorTask(task.ErrorTask):  # the library's protocol errors, as JSON like the application's
            def execute(self):
                e = self.request.error
                code, reason = (505, "HTTP Version Not Supported") if other_major(self.request.version) \
                    else (e.code, e.reason)
                why = TOO_LARGE.format(limits.max_body_bytes) if code == 413 else \
                    f"{reason}: {e.body.rstrip('.')}; " + ("send fewer or shorter headers" if code == 431 else
                                                           "send a well-formed HTTP/1.0 or HTTP/1.1 request")
                data = json.dumps({"error": why, "status": code}).encode("utf-8")
                self.status, self.content_length = f"{code} {reason}", len(data)
                self.response_headers.append(("Content-Type", "application/json"))
                self.request.headers.pop("CONNECTION", None)  # else an HTTP/1.0 keep-alive is announced, then closed
                self.set_close_on_finish()
                self.write(data)

        self.server = server.create_server(  # poll(): no select() limit of 1024 sockets
            self, map=self._map, sockets=[sock], threads=limits.workers, connection_limit=limits.max_connections,
            channel_timeout=limits.idle_timeout_s, cleanup_interval=max(1, limits.idle_timeout_s // 4),
            asyncore_use_poll=True, max_request_body_size=4 * limits.max_body_bytes + 1, ident="projectable-edge")

        class StrictParser(parser.HTTPRequestParser):
            def received(self, data):
                # a header ended by bare LFs never ends for waitress (it waits for CRLF CRLF until the idle
                # timeout): answer a 400 at once instead
                head = self.header_plus + data
                if self.body_rcv is None and not self.completed and b"\r\n\r\n" not in head and b"\n\n" in head:
                    self.parse_header(b"GET / HTTP/1.0\r\n")  # a request to hang the error on, as waitress does
                    self.error = parser.BadRequest("lines end in a bare LF; end each line with CRLF (RFC 9112 2.2)")
                    self.completed = True
                    return len(data)
                return super().received(data)

            def parse_header(self, header_plus):
                super().parse_header(header_plus)
                if other_major(self.version):  # HTTP/2 prior knowledge (`PRI * HTTP/2.0`), 3.0, 0.9: RFC 9110 15.6.6
                    raise parser.ParsingError(f"HTTP/{self.version} is not served")
                # HTTP/1.0 has no chunked coding: waitress would read the body as the next request (smuggling
                # behind a proxy); RFC 9112 6.1: refuse it and close
                if self.version == "1.0" and "TRANSFER_ENCODING" in self.headers:
                    raise parser.ParsingError("Transfer-Encoding in an HTTP/1.0 request")
                if self.version == "1.1" and "HOST" not in self.headers:  # RFC 9112 3.2: a 400
                    raise parser.ParsingError("no Host header in an HTTP/1.1 request")
                if "," in self.headers.get("HOST", ""):  # RFC 9112 3.2: so is more than one (waitress joins them)
                    raise parser.ParsingError("more than one Host header, or a list in one")
                # waitress frames the body by Transfer-Encoding, a front end may by Content-Length and read the rest
                # as the next request; RFC 9112 6.3: refuse it and close
                if self.chunked and "CONTENT_LENGTH" in self.headers:
                    raise parser.ParsingError("both Content-Length and Transfer-Encoding in a request")

        class TurnTask(task.WSGITask):
            def build_response_header(self):
                # at the connection limit with clients waiting to be accepted, an answer closes its connection: else
                # a keep-alive client holds its slot for as long as it keeps sending (ab -k: until it is done, then
                # the idle timeout), and the clients in the backlog wait all that time
                if draining.is_set():  # the server closes it once this is sent
                    self.request.headers["CONNECTION"] = "close"
                elif self.channel.server.in_connection_overflow:
                    backlog = select.poll()
                    backlog.register(self.channel.server.socket, select.POLLIN)
                    if backlog.poll(0):
                        self.request.headers["CONNECTION"] = "close"
                return super().build_response_header()

        class JsonChannel(channel.HTTPChannel):
            error_task_class, parser_class, task_class = JsonErrorTask, StrictParser, TurnTask
            arriving_since = None  # when the request now arriving sent its first byte (None: none is)
            stalled_at = None  # last_activity when maintenance first saw an answer waiting unread

            def send_continue(self):
                # a request refused on its headers (a body far over the limit, no Host) gets its error now, not
                # after the body waitress's `100 Continue` asked for (or, with none coming, the idle timeout); one
                # already whole (Content-Length: 0, a GET) is answered: waitress would mark it unfinished again
                if not self.request.completed:
                    super().send_continue()

            def received(self, data):
                if self.request is None:
                    self.arriving_since = time.time()
                try:
                    return super().received(data)
                finally:
                    if self.request is None:
                        self.arriving_since = None

            def readable(self):
                return not draining.is_set() and super().readable()

            def writable(self):
                # A running task's worker sends its own output and wakes the loop when the socket is full or it ends;
                # waitress's loop would spin on the taken buffer lock, starving the workers of the GIL (100 keep-alive
                # clients: 120 requests/s, not 2,000). So wait, unless past the high-water mark (workers await a drain).
                if self.requests and not (self.will_close or self.close_when_flushed):
                    return self.total_outbufs_len > self.adj.outbuf_high_watermark
                return super().writable()

        self.server.channel_class = JsonChannel
        # waitress counts its listening socket and its wake-up pipe as connections: the limit is on clients
        self.server.adj.connection_limit = limits.max_connections + len(self._map)
        waitress_maintenance = self.server.maintenance

        def maintenance(now: float) -> None:
            """Beside waitress's idle close (only once no request is left), close a connection whose request has been
            arriving for the timeout (slowloris) or whose answer sat unread that long (seen twice: not one just
            written); else a few such clients hold every slot, and a worker waits on a full buffer for ever."""
            waitress_maintenance(now)
            cutoff = now - limits.idle_timeout_s
            for ch in list(self.server.active_channels.values()):
                slow = not ch.requests and ch.arriving_since is not None and ch.arriving_since < cutoff
                unread = ch.total_outbufs_len > 0 and ch.last_activity < cutoff
                if slow or (unread and ch.stalled_at == ch.last_activity):
                    # shut down, not closed: closing frees the socket's number mid-poll, and a connection accepted
                    # in the same round would reuse it and be closed as this one; the loop closes it on its next poll
                    with contextlib.suppress(OSError):
                        ch.socket.shutdown(socket.SHUT_RDWR)
                ch.stalled_at = ch.last_activity if unread else None

        self.server.maintenance = maintenance
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # a queue is --workers doing its job
        self.url = "http://{}:{}".format(f"[{host}]" if ":" in host else host, sock.getsockname()[1])

    def run(self) -> None:
        srv = self.server
        try:  # until stop() closed every socket, or Ctrl-C (SIGTERM): then no new connection or request is taken,
            srv.asyncore.loop(timeout=srv.adj.asyncore_loop_timeout, map=self._map, use_poll=True)
        except KeyboardInterrupt:  # and the requests already read are answered (waitress alone dropped those queued)
            self._draining.set()
            srv.accepting, deadline = False, time.monotonic() + self.limits.idle_timeout_s
            while time.monotonic() < deadline and any(ch.requests or ch.total_outbufs_len
                                                      for ch in list(srv.active_channels.values())):
                srv.asyncore.loop(timeout=0.05, map=self._map, use_poll=True, count=1)
        srv.task_dispatcher.shutdown()
        self._close_all()
        self.ended = True  # stop() now has nothing to do: its pipe is closed, and its number may be reused

    def stop(self) -> None:
        """From any thread: close every socket inside the server's loop, so run() returns (after run(), nothing). Where
        the loop's wake-up pipe fails (EBADF: seen once in a test run with several servers in one process, while the
        loop ran), close what is left from here: the loop ends on its next round."""
        if self.ended:
            return
        try:
            self.server.trigger.pull_trigger(self._close_all)
        except OSError:
            self._close_all()

    def __call__(self, environ: dict, start_response) -> list[bytes]:
        method, path, headers = environ["REQUEST_METHOD"], environ["PATH_INFO"], []
        try:
            # HEAD of a GET route: that GET's status and headers, never a body (a client reads it as the next response)
            routed = "GET" if method == "HEAD" and ("GET", path) in ROUTES else method
            status, out = 200, self.answer(routed, path, environ.get("CONTENT_TYPE", ""), environ["wsgi.input"].read(),
                                           environ.get("HTTP_CONTENT_ENCODING", ""))
        except RequestError as e:
            status, out, headers = e.args[0], {"error": e.args[1], "status": e.args[0]}, e.args[2:]
        except Exception as e:  # the server's own fault: 500, logged (in one line unless --verbose), serving goes on
            status, out = 500, {"error": f"internal error: {type(e).__name__}: {e}", "status": 500}
            if self.verbose:
                traceback.print_exc(file=sys.stderr)
            else:
                print(f"error: {method} {json.dumps(path)[1:-1]}: internal error: {type(e).__name__}: {one_line(e)} "
                      "(rerun with --verbose for the traceback)", file=sys.stderr, flush=True)
        if self.access_log:  # the path as a JSON string: a %0A or an escape sequence in it cannot forge a line
            sys.stderr.write(f'{environ["REMOTE_ADDR"]} "{method} {json.dumps(path)[1:-1]} '
                             f'{environ["SERVER_PROTOCOL"]}" {status}\n')
        data = json.dumps(out).encode("utf-8")
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers])
        return [] if method == "HEAD" else [data]

    def answer(self, method: str, path: str, content_type: str, data: bytes, encoding: str = "") -> dict:
        if len(data) > self.limits.max_body_bytes:  # up to 4x is read, so that a client gets this, not a reset
            raise RequestError(413, TOO_LARGE.format(self.limits.max_body_bytes))
        ctype = content_type.split(";")[0].strip().lower()
        if (method, path) not in ROUTES:
            if allowed := ", ".join(sorted(m for m, p in ROUTES if p == path)):
                raise RequestError(405, f"{method} {path} is not supported; use {allowed} {path}", ("Allow", allowed))
            shown = path if len(path) <= 100 else path[:100] + "..."
            raise RequestError(404, f"no route {shown}; routes: GET /healthz, POST /score, POST /sample")
        if method == "GET":
            m = self.model
            out = {"status": "ok", "task": m.task, "variant": m.variant, "backend": m.backend["backend"],
                   "providers": m.backend["providers"], "image_shape": list(m.tokenizer.image_shape),
                   "seq_len": m.seq_len, "vocab_size": m.tokenizer.vocab_size, "limits": asdict(self.limits),
                   "uptime_s": round(time.time() - self.started, 3), "requests_served": self.served}
        elif not data:
            raise RequestError(400, "empty body; send a JSON object (GET /healthz shows the image shape)")
        elif encoding.strip().lower() not in ("", "identity"):  # RFC 9110 15.5.16: 415, naming what is accepted
            raise RequestError(415, f"Content-Encoding {encoding!r} is not accepted; send the body uncompressed",
                               ("Accept-Encoding", "identity"))
        elif path == "/score" and ctype in NPY_TYPES:
            try:
                a = read_npy(data, "the body")
            except ProjectableEdgeError as e:
                raise RequestError(400, str(e)) from None
            out = self.score(a, images=a.dtype == np.uint8 or a.ndim >= 3)  # the runtime's rule (Model.to_tokens)
        elif ctype not in JSON_TYPES:
            raise RequestError(415, f"Content-Type {ctype!r} is not accepted; send application/json"
                                    + (" or application/x-npy" if path == "/score" else ""))
        elif path == "/score":
            body = _json(data, {"images", "tokens"})
            if ("images" in body) == ("tokens" in body):
                raise RequestError(400, "send exactly one of 'images' (uint8 [N, H, W]) or 'tokens' (int [N, T])")
            name = "images" if "images" in body else "tokens"
            try:
                a = np.array(body[name])
            except (ValueError, OverflowError, TypeError, RecursionError) as e:
                why = "nested too deeply" if type(e) is RecursionError else "ragged: rows of different lengths"
                raise RequestError(400, f"'{name}' is not an array ({why})") from None
            out = self.score(a, images=name == "images")
        else:
            out = self.sample(_json(data, {"n", "seed", "temperature", "top_k"}))
        with self._lock:
            self.served += 1
        return out

    def score(self, x: np.ndarray, images: bool) -> dict:
        """Images [N, H, W] (0..255) or tokens [N, T]; the runtime's validators name shape, dtype and range."""
        t0, tok = time.perf_counter(), self.model.tokenizer
        if x.ndim and not len(x):
            raise RequestError(400, f"no {'images' if images else 'tokens'} in the request; send at least one")
        try:
            tokens = tok.encode(x) if images else validate_tokens(x, tok.vocab_size, length=self.model.seq_len,
                                                                   allow_empty=False, what="'tokens'")
        except ProjectableEdgeError as e:
            raise RequestError(400, str(e)) from None
        if len(tokens) > self.limits.max_batch:
            raise RequestError(413, f"{len(x)} images in one request; at most {self.limits.max_batch}: split the batch")
        bits = self.model.score(tokens)
        return {"bits_per_dim": [float(b) for b in bits], "n": int(len(bits)), "variant": self.model.variant,
                "task": self.model.task.get("name"), "latency_ms": (time.perf_counter() - t0) * 1e3}

    def sample(self, body: dict) -> dict:
        n = _number(body, "n", int, 1)
        if not 1 <= n <= self.limits.max_sample:
            raise RequestError(400 if n < 1 else 413, f"'n' must be 1..{self.limits.max_sample}, got {n}")
        seed, temperature = _number(body, "seed", int, 0), _number(body, "temperature", float, 1.0)
        top_k, t0 = None if body.get("top_k") is None else _number(body, "top_k", int, None), time.perf_counter()
        try:
            tokens = self.model.sample(n, temperature=temperature, top_k=top_k, seed=seed)
        except ProjectableEdgeError as e:
            raise RequestError(400, str(e)) from None
        return {"tokens": tokens.tolist(), "images": self.model.decode_images(tokens).tolist(), "n": n,
                "seed": seed, "variant": self.model.variant, "latency_ms": (time.perf_counter() - t0) * 1e3}


def add_arguments(p) -> None:
    """`serve`'s own options (the bundle, --precision, --json, ... come from the CLI's common parser)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 = any free port)")
    for f in fields(Limits):
        p.add_argument(f"--{f.name.removesuffix('_s').replace('_', '-')}", type=int, default=f.default,
                       help=f.metadata["help"])
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")


def command(model, args):
    """Serve until Ctrl-C or SIGTERM, printing one line per event (JSON Lines with --json): (result, 0, None)."""
    limits = Limits(**{f.name: getattr(args, f.name.removesuffix("_s")) for f in fields(Limits)})
    server = ModelServer(model, args.host, args.port, limits, args.access_log, getattr(args, "verbose", False))
    say = lambda event, text: print(json.dumps(event) if args.json else text, flush=True)  # noqa: E731

    def interrupt(signum, frame):  # SIGTERM stops it as Ctrl-C does. Later ones, until the process ends, are ignored:
        for s in (signal.SIGINT, signal.SIGTERM):  # one used to break the wait for the workers, and the process
            signal.signal(s, signal.SIG_IGN)  # exited while one was inside onnxruntime (an abort)
        raise KeyboardInterrupt

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, interrupt)
    with contextlib.suppress(KeyboardInterrupt):  # (installed before the URL is announced: no race)
        say({"event": "serving", "url": server.url, "task": model.task.get("name"), "variant": model.variant,
             "pid": os.getpid()}, f"serving task {model.task.get('name')} ({model.variant}) on {server.url} "
            f"(GET /healthz, POST /score, POST /sample; pid {os.getpid()}); Ctrl-C stops")
        server.run()
    out = {"event": "stopped", "url": server.url, "requests_served": server.served,
           "uptime_s": time.time() - server.started}
    say(out, f"stopped; served {out['requests_served']} requests in {out['uptime_s']:.1f} s")
    return out, 0, None
