"""`python -m projectable_edge_runtime serve` on waitress, driven by clients nobody here wrote.

Python's http.client and urllib (HTTP/1.1), a raw HTTP/1.0 keep-alive exchange, and, where the
binaries exist, curl --http1.0 / --http1.1 and ApacheBench with and without -k. Every malformed
request gets a 4xx with a JSON error and the server keeps serving; valid requests return exactly what
the runtime computes in-process; idle and slow clients starve no one; SIGTERM stops it cleanly.
"""
from __future__ import annotations

import asyncio
import gzip
import http.client
import io
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager, suppress
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the host package depends on tomli there
    import tomli as tomllib
from urllib.parse import urlsplit

import numpy as np
import pytest

import projectable_edge_runtime as runtime
from projectable_edge_runtime.commands.serve import SERVE_REQUIRES, Limits, ModelServer

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_body_bytes=64 * 1024, max_batch=8, max_sample=4, workers=2, idle_timeout_s=5)


@pytest.fixture(scope="module")
def model(rt_bundle):
    with runtime.load(rt_bundle) as m:
        yield m


@contextmanager
def running(model, limits: Limits = LIMITS, before=lambda srv: None, host="127.0.0.1"):
    """A server on a free port (loopback unless `host`), served by a thread until the block ends; `before(srv)`
    runs once it is bound and listening, before it serves."""
    srv = ModelServer(model, host, 0, limits)
    before(srv)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop()
        thread.join(10)
        assert not thread.is_alive(), "stop() did not end run()"


@pytest.fixture(scope="module")
def server(model):
    with running(model) as srv:
        yield srv


def address(srv) -> tuple[str, int]:
    u = urlsplit(srv.url)
    return u.hostname, u.port


def request(srv, method, path, body=None, headers=None, conn=None):
    """One request with http.client; returns (status, parsed JSON body, response)."""
    c = conn or http.client.HTTPConnection(*address(srv), timeout=30)
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    if conn is None:
        c.close()
    assert r.getheader("Content-Type") == "application/json", data[:200]
    return r.status, json.loads(data), r


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def goldens(model) -> np.ndarray:
    with np.load(model.bundle_dir / "goldens.npz") as z:
        return z["tokens"]


def _valid_tokens(model, n=1):
    return goldens(model)[:n].tolist()


def test_healthz(server, model):
    status, out, r = request(server, "GET", "/healthz")
    assert status == 200 and out["status"] == "ok" and r.getheader("Server") == "projectable-edge"
    assert out["task"] == model.task and out["variant"] == model.variant
    assert out["image_shape"] == [8, 8] and out["seq_len"] == model.seq_len
    assert out["limits"]["max_batch"] == LIMITS.max_batch


@pytest.mark.parametrize("form", ["tokens", "images", "npy-images", "npy-tokens", "chunked"])
def test_score_equals_the_runtime_in_process(server, model, form):
    tokens = goldens(model)[:5]
    images = model.decode_images(tokens)
    body, headers = {
        "tokens": ({"tokens": tokens.tolist()}, {}),
        "images": ({"images": images.tolist()}, {"Content-Type": "application/json"}),
        "npy-images": (npy(images), {"Content-Type": "application/x-npy"}),
        "npy-tokens": (npy(tokens.astype(np.int32)), {"Content-Type": "application/x-npy"}),
        # an iterable body: http.client sends it with Transfer-Encoding: chunked
        "chunked": (iter([b'{"tokens": ', json.dumps(tokens.tolist()).encode(), b"}"]), {}),
    }[form]
    status, out, _ = request(server, "POST", "/score", body, headers)
    assert status == 200, out
    expected = model.score(tokens)
    assert out["n"] == 5
    np.testing.assert_allclose(out["bits_per_dim"], expected, rtol=0, atol=1e-9)


def test_sample_is_the_runtimes_sample(server, model):
    status, out, _ = request(server, "POST", "/sample", {"n": 3, "seed": 7, "top_k": 5})
    assert status == 200, out
    expected = model.sample(3, seed=7, top_k=5)
    assert np.array_equal(np.array(out["tokens"]), expected)
    assert np.array_equal(np.array(out["images"], dtype=np.uint8), model.decode_images(expected))


# (name, method, path, body, headers, expected status, a word the error must contain)
MALFORMED = [
    ("unknown route", "GET", "/nope", None, {}, 404, "no route"),
    ("wrong method", "GET", "/score", None, {}, 405, "POST /score"),
    ("unknown method", "BREW", "/healthz", None, {}, 405, "GET /healthz"),
    ("bad JSON", "POST", "/score", b"{tokens: [", {}, 400, "not valid JSON"),
    ("not UTF-8", "POST", "/score", b"\xff\xfe{}", {}, 400, "not valid JSON"),
    ("deeply nested JSON", "POST", "/score", b'{"tokens": ' + b"[" * 30000 + b"]" * 30000 + b"}", {}, 400,
     "nested"),
    ("JSON not an object", "POST", "/score", [1, 2], {}, 400, "JSON object"),
    ("empty body", "POST", "/score", b"", {}, 400, "empty body"),
    ("neither images nor tokens", "POST", "/score", {}, {}, 400, "exactly one"),
    ("unknown field", "POST", "/score", {"tokens": [[0] * 64], "extra": 1}, {}, 400, "unknown field"),
    ("wrong shape: short tokens", "POST", "/score", {"tokens": [[0, 1, 2]]}, {}, 400, "shape"),
    ("wrong shape: 1-D tokens", "POST", "/score", {"tokens": [0] * 64}, {}, 400, "shape"),
    ("wrong shape: a number", "POST", "/score", {"tokens": 5}, {}, 400, "shape"),
    ("wrong shape: image size", "POST", "/score", {"images": [[[0] * 7] * 8]}, {}, 400, "shape"),
    ("wrong shape: single image unwrapped", "POST", "/score", {"images": [[0] * 8] * 8}, {}, 400, "wrap"),
    ("wrong shape: ragged", "POST", "/score", {"tokens": [[0] * 64, [0] * 63]}, {}, 400, "ragged"),
    ("wrong dtype: floats", "POST", "/score", {"tokens": [[0.5] * 64]}, {}, 400, "dtype"),
    ("wrong dtype: booleans", "POST", "/score", {"tokens": [[True] * 64]}, {}, 400, "dtype"),
    ("wrong dtype: strings", "POST", "/score", {"tokens": [["a"] * 64]}, {}, 400, "dtype"),
    ("wrong dtype: nulls", "POST", "/score", {"tokens": [[None] * 64]}, {}, 400, "dtype"),
    ("wrong dtype: huge ints", "POST", "/score", {"tokens": [[10 ** 30] * 64]}, {}, 400, "dtype"),
    ("tokens out of range", "POST", "/score", {"tokens": [[99] * 64]}, {}, 400, "out of range"),
    ("negative tokens", "POST", "/score", {"tokens": [[-1] * 64]}, {}, 400, "out of range"),
    ("image values over 255", "POST", "/score", {"images": [[[300] * 8] * 8]}, {}, 400, "0..255"),
    ("too many images", "POST", "/score", {"tokens": [[0] * 64] * 9}, {}, 413, "at most 8"),
    ("body too large", "POST", "/score", b"[" + b" " * (64 * 1024) + b"]", {}, 413, "larger than the limit"),
    ("unsupported content type", "POST", "/score", b"x", {"Content-Type": "image/png"}, 415, "Content-Type"),
    ("gzip-compressed JSON", "POST", "/score", gzip.compress(json.dumps({"tokens": [[0] * 64]}).encode()),
     {"Content-Encoding": "gzip"}, 415, "Content-Encoding"),
    ("compressed npy", "POST", "/score", gzip.compress(npy(np.zeros((1, 64), np.int64))),
     {"Content-Type": "application/x-npy", "Content-Encoding": "gzip"}, 415, "uncompressed"),
    ("npy: not an array", "POST", "/score", b"not numpy", {"Content-Type": "application/x-npy"}, 400, ".npy"),
    ("npy: float dtype", "POST", "/score", npy(np.zeros((1, 64), np.float32)),
     {"Content-Type": "application/x-npy"}, 400, "dtype"),
    ("npy: float images (read as images, as the runtime does, not as tokens)", "POST", "/score",
     npy(np.zeros((1, 8, 8), np.float32)), {"Content-Type": "application/x-npy"}, 400, "images must be uint8"),
    ("npy: wrong shape", "POST", "/score", npy(np.zeros((1, 9, 9), np.uint8)),
     {"Content-Type": "application/x-npy"}, 400, "shape"),
    ("npy: a scalar", "POST", "/score", npy(np.uint8(5)), {"Content-Type": "application/x-npy"}, 400, "shape"),
    ("npy: too many images", "POST", "/score", npy(np.zeros((9, 8, 8), np.uint8)),
     {"Content-Type": "application/x-npy"}, 413, "at most"),
    ("npy: no images", "POST", "/score", npy(np.zeros((0, 8, 8), np.uint8)), {"Content-Type": "application/x-npy"},
     400, "at least one"),
    ("npy: a header declaring 477 GiB", "POST", "/score", npy(np.zeros((1, 64), np.int64)).replace(b"(1, 64)",
     b"(1000000000, 64)"), {"Content-Type": "application/x-npy"}, 400, "declares shape"),
    ("npy: a pickle", "POST", "/score", npy(np.array([None, 1], dtype=object)), {"Content-Type": "application/x-npy"},
     400, "Python objects"),
    ("sample: n too large", "POST", "/sample", {"n": 5}, {}, 413, "1..4"),
    ("sample: n zero", "POST", "/sample", {"n": 0}, {}, 400, "1..4"),
    ("sample: n not an integer", "POST", "/sample", {"n": "two"}, {}, 400, "integer"),
    ("sample: negative temperature", "POST", "/sample", {"n": 1, "temperature": -1}, {}, 400, "temperature"),
    ("sample: NaN temperature", "POST", "/sample", b'{"n": 1, "temperature": NaN}', {}, 400, "temperature"),
    ("sample: temperature 1e-308 (overflows)", "POST", "/sample", {"n": 1, "temperature": 1e-308}, {}, 400, "greedy"),
    ("sample: top_k too large", "POST", "/sample", {"n": 1, "top_k": 1000}, {}, 400, "top_k"),
    ("sample: negative seed", "POST", "/sample", {"n": 1, "seed": -3}, {}, 400, "seed"),
    ("sample: npy body", "POST", "/sample", npy(np.zeros(1)), {"Content-Type": "application/x-npy"}, 415,
     "Content-Type"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request_is_a_json_4xx_and_the_server_keeps_serving(server, model, case):
    name, method, path, body, headers, want, word = case
    status, out, r = request(server, method, path, body, headers)
    assert status == want, out
    assert out["status"] == want and word in out["error"], out
    if want == 405:
        assert r.getheader("Allow") in ("GET", "POST")
    if "Content-Encoding" in headers:  # RFC 9110 15.5.16: the codings it takes
        assert r.getheader("Accept-Encoding") == "identity"
    status, out, _ = request(server, "POST", "/score", {"tokens": _valid_tokens(model)})
    assert status == 200 and len(out["bits_per_dim"]) == 1


def test_keep_alive_connection_stays_in_step_after_errors(server, model):
    """Errors on a reused connection, a body over the limit included (read, up to 4x the limit, and
    answered 413), never desynchronise the next request."""
    c = http.client.HTTPConnection(*address(server), timeout=30)
    for body, want in [({"tokens": [[0, 1]]}, 400), (b"{bad", 400), ({"tokens": _valid_tokens(model)}, 200),
                       (b" " * (LIMITS.max_body_bytes + 1), 413), ({"tokens": _valid_tokens(model)}, 200)]:
        assert request(server, "POST", "/score", body, conn=c)[0] == want
    assert request(server, "POST", "/nope", {"tokens": 1}, conn=c)[0] == 404  # body read even when unrouted
    assert request(server, "GET", "/healthz", conn=c)[0] == 200
    c.close()


def test_head_is_get_without_a_body_and_the_connection_stays_in_step(server, model):
    # uptime monitors and some load generators probe with HEAD
    c = http.client.HTTPConnection(*address(server), timeout=30)
    c.request("HEAD", "/healthz")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b"" and int(r.getheader("Content-Length")) > 0
    assert r.getheader("Content-Type") == "application/json"
    assert request(server, "GET", "/healthz", conn=c)[1]["status"] == "ok"  # the next answer is whole
    c.request("HEAD", "/score")
    r = c.getresponse()
    assert r.status == 405 and r.read() == b""
    assert request(server, "POST", "/score", {"tokens": _valid_tokens(model)}, conn=c)[0] == 200
    c.close()
    for path in ("/healthz", "/score"):  # byte for byte, until the server closes: nothing follows the headers
        with socket.create_connection(address(server), timeout=30) as sock:
            raw = send(sock, f"HEAD {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()).read()
        assert raw.startswith(b"HTTP/1.1 ") and raw.index(b"\r\n\r\n") == len(raw) - 4, raw


def send(sock: socket.socket, data: bytes):
    """Send raw bytes (what http.client would not send); a reader of the responses, kept per connection
    so that pipelined responses are read one after the other."""
    sock.sendall(data)
    return sock.makefile("rb")


def response(f) -> tuple[str, dict, dict]:
    """One response from a connection's reader: (status line, headers, JSON body by its Content-Length)."""
    status_line = f.readline().decode("latin-1").strip()
    assert status_line, "the connection closed before a response"
    headers = {}
    while line := f.readline().decode("latin-1").strip():
        key, value = line.split(":", 1)
        headers[key.lower()] = value.strip()
    return status_line, headers, json.loads(f.read(int(headers["content-length"])))


def closed(f) -> bool:
    """True when the server closed the connection (EOF); waits up to the socket's timeout."""
    return f.read(1) == b""


@pytest.mark.parametrize("data, want", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"get /healthz HTTP/1.1\r\n\r\n", 400),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n", 413),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /sample HTTP/1.0\r\nConnection: Keep-Alive\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
     b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    (b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n", 413),
    (b"POST /score HTTP/1.1\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n", 400),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    (b"GET /healthz HTTP/3.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /healthz HTTP/1.1\nHost: x\n\n", 400),
], ids=["bad request line", "lower-case method", "bad Content-Length", "body far over the limit (not read)",
        "unknown transfer coding (RFC 9112: 501)", "chunked in HTTP/1.0, a request smuggled in its body",
        "HTTP/1.1 without Host (RFC 9112: 400)", "two Host headers (RFC 9112: 400)",
        "Content-Length and chunked, a request smuggled after the chunks (RFC 9112: close)",
        "Expect: 100-continue, body far over the limit: the 413 at once, no 100",
        "Expect: 100-continue without Host: the 400 at once, no 100",
        "HTTP/2 prior knowledge (RFC 9110: 505)", "another major version (RFC 9110: 505)",
        "bare LF line ends: a 400 at once, not silence until the idle timeout"])
def test_protocol_errors_are_json_and_close_the_connection(server, data, want):
    """The library's own errors come back in the application's JSON shape, and nothing after them on the
    connection is answered (a request hidden in a body the library cannot frame included)."""
    with socket.create_connection(address(server), timeout=30) as s:
        f = send(s, data)
        status_line, headers, out = response(f)
        assert int(status_line.split()[1]) == want and out["status"] == want and out["error"], out
        assert headers["content-type"] == "application/json" and headers["connection"] == "close"
        assert closed(f)
    assert request(server, "GET", "/healthz")[0] == 200


def test_headers_over_the_limit_are_a_431_naming_the_fix(server):
    """A 300 KB header (waitress reads 256 KB of them) is a JSON 431 that says to send fewer or shorter headers,
    not "send a well-formed request": the request is well-formed."""
    with socket.create_connection(address(server), timeout=30) as s:
        def send_all():
            with suppress(OSError):  # the server closes once it has answered
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n")

        sender = threading.Thread(target=send_all)
        sender.start()
        status_line, _, out = response(s.makefile("rb"))
        sender.join()
    assert " 431 " in status_line and out["status"] == 431 and "fewer or shorter headers" in out["error"], out


def test_http10_keep_alive_is_announced_and_honoured(server, model):
    """An HTTP/1.0 client (ab -k, many proxies) asking for keep-alive gets `Connection: Keep-Alive` and its
    connection kept; without the header the server closes after the response."""
    body = json.dumps({"tokens": _valid_tokens(model)}).encode()
    with socket.create_connection(address(server), timeout=30) as s:
        f = send(s, b"GET /healthz HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        line, h, out = response(f)
        assert line.startswith("HTTP/1.0 200") and h["connection"].lower() == "keep-alive" and out["status"] == "ok"
        send(s, b"POST /score HTTP/1.0\r\nConnection: Keep-Alive\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        line, h, out = response(f)
        assert line.startswith("HTTP/1.0 200") and h["connection"].lower() == "keep-alive"
        assert out["bits_per_dim"][0] == pytest.approx(model.score(goldens(model)[:1])[0], abs=1e-9)
        send(s, b"GET /healthz HTTP/1.0\r\n\r\n")  # no keep-alive: closed after the response
        line, h, out = response(f)
        assert line.startswith("HTTP/1.0 200") and h["connection"].lower() == "close" and closed(f)
    with socket.create_connection(address(server), timeout=30) as s:  # a later minor version: served (RFC 9110 2.5)
        f = send(s, b"GET /healthz HTTP/1.2\r\nHost: x\r\n\r\n")
        line, h, out = response(f)
        assert line.startswith("HTTP/1.0 200") and out["status"] == "ok" and closed(f)


def test_pipelined_requests_are_answered_in_order(server, model):
    body = json.dumps({"tokens": _valid_tokens(model)}).encode()
    score = b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with socket.create_connection(address(server), timeout=30) as s:
        f = send(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + score + b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response(f)[2]["status"] == "ok"
        assert len(response(f)[2]["bits_per_dim"]) == 1
        assert response(f)[2]["status"] == 404


def test_expect_100_continue_without_a_body_is_answered(server):
    """A request already whole with its headers (no body, Content-Length: 0) asking for `100 Continue` is
    answered at once: waitress sent the 100 and then waited for a body that never comes until the idle timeout."""
    with socket.create_connection(address(server), timeout=3) as s:
        f = send(s, b"GET /healthz HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\r\n"
                    b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n")
        assert response(f)[2]["status"] == "ok"
        line, _, out = response(f)
        assert line.startswith("HTTP/1.1 400") and "empty body" in out["error"]


def test_an_incomplete_request_is_closed_without_using_a_worker(model):
    """A body that never arrives (stalled, or cut short by the client's close) is buffered by the library
    and dropped, never handed to a worker half-read (the old server answered 408/400 from a worker)."""
    with running(model, Limits(idle_timeout_s=1)) as srv:
        for cut in (False, True):
            with socket.create_connection(address(srv), timeout=30) as s:
                f = send(s, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"tokens\"")
                if cut:
                    s.shutdown(socket.SHUT_WR)
                assert closed(f)
        assert srv.served == 0
        assert request(srv, "GET", "/healthz")[0] == 200


def test_a_404_and_the_access_log_do_not_echo_what_a_client_forges(model, capsys):
    """A 404 names at most 100 characters of the path; the access log writes a path's control characters
    escaped, so a %0A cannot add a line, nor an escape sequence reach the operator's terminal."""
    with running(model, Limits(), before=lambda srv: setattr(srv, "access_log", True)) as srv:
        status, out, _ = request(srv, "GET", "/" + "x" * 5000)
        assert status == 404 and len(out["error"]) < 300, len(out["error"])
        capsys.readouterr()
        assert request(srv, "GET", "/healthz%0A10.0.0.9%20%22POST%20/score%22%20200%1b%5b31m")[0] == 404
    log = capsys.readouterr().err
    assert len(log.splitlines()) == 1 and "\x1b" not in log and "\\n10.0.0.9" in log, log


def test_the_connection_limit_counts_clients_only(model):
    """--max-connections N serves N clients at once (waitress counted its own two sockets too: 2 served none)
    and the next waits in the backlog until one of them closes."""
    with running(model, Limits(max_connections=2)) as srv:
        held = [http.client.HTTPConnection(*address(srv), timeout=30) for _ in range(2)]
        assert [request(srv, "GET", "/healthz", conn=c)[0] for c in held] == [200, 200]
        with socket.create_connection(address(srv), timeout=30) as third:
            f = send(third, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert select.select([third], [], [], 1.0)[0] == []  # not accepted while two are open
            held.pop().close()
            assert response(f)[2]["status"] == "ok"
        held[0].close()


def test_busy_keep_alive_clients_at_the_limit_make_way_for_those_waiting(model):
    """ab -k with more clients than --max-connections: the clients it had connected kept their connections, so
    those in the backlog waited until ab was done and the idle timeout closed them (p99 16 s for `ab -k -c 600`).
    While clients wait to be accepted, an answer now closes its connection, so they take turns."""
    with running(model, Limits(max_connections=2, idle_timeout_s=30)) as srv:
        stop, answers, errors = threading.Event(), [], []

        def busy():  # http.client reconnects after a `Connection: close`
            c = http.client.HTTPConnection(*address(srv), timeout=30)
            while not stop.is_set():
                try:
                    answers.append(request(srv, "POST", "/score", {"tokens": _valid_tokens(model)}, conn=c)[0])
                except (OSError, http.client.HTTPException) as e:
                    errors.append(repr(e))
            c.close()

        threads = [threading.Thread(target=busy) for _ in range(2)]
        for t in threads:
            t.start()
        while len(answers) < 10:
            time.sleep(0.01)
        t0 = time.monotonic()
        try:
            with socket.create_connection(address(srv), timeout=5) as third:
                assert response(send(third, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"))[2]["status"] == "ok"
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert time.monotonic() - t0 < 5 and not errors and set(answers) == {200}, errors[:3]


def test_clients_that_never_finish_a_request_or_never_read_are_closed_after_the_idle_timeout(model):
    """A client trickling a request byte by byte (slowloris), or one that pipelines requests and never reads
    the answers, holds the only connection slot for about the idle timeout, not for ever: then the next
    client is served. (waitress closed neither: it closes a silent connection only once no request is left.)"""
    def slowloris(sock, stop):
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            if stop.wait(0.25):
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return

    def deaf(sock, stop):
        sock.setblocking(False)
        while not stop.is_set():
            try:
                sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
            except BlockingIOError:  # the server stopped reading: its answers wait, unread
                stop.wait(0.05)
            except OSError:
                return

    for client in (slowloris, deaf):
        with running(model, Limits(max_connections=1, idle_timeout_s=1)) as srv:
            sock, stop = socket.socket(), threading.Event()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(address(srv))
            threading.Thread(target=client, args=(sock, stop), daemon=True).start()
            try:
                time.sleep(0.5)  # it holds the slot
                t0 = time.time()
                assert request(srv, "GET", "/healthz")[0] == 200, client.__name__
                assert time.time() - t0 < 15, client.__name__  # the 30 s client timeout would fail first
            finally:
                stop.set()
                sock.close()


def test_stop_ends_the_server_even_where_its_wake_up_pipe_is_gone(model):
    """stop() pulls the loop's wake-up pipe; where that fails (EBADF, seen once with several servers in one test
    process, while the loop still ran) it closes the sockets itself, so run() still returns; after run() has
    returned, stop() is harmless."""
    srv = ModelServer(model, "127.0.0.1", 0, LIMITS)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    assert request(srv, "GET", "/healthz")[0] == 200

    def gone():
        raise OSError(9, "Bad file descriptor")

    srv.server.trigger._physical_pull = gone
    srv.stop()
    thread.join(10)
    assert not thread.is_alive(), "stop() did not end run()"
    srv.stop()
    with pytest.raises(OSError):
        request(srv, "GET", "/healthz")


def test_an_internal_fault_is_a_500_and_the_server_keeps_serving(server, model, monkeypatch, capsys):
    def broken(x):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(server.model, "score", broken)
    status, out, _ = request(server, "POST", "/score", {"tokens": _valid_tokens(model)})
    assert status == 500 and "boom" in out["error"]
    logged = capsys.readouterr().err
    assert "Traceback" not in logged and logged.count("\n") == 1 and "boom second line" in logged, logged
    assert "--verbose" in logged
    server.verbose = True  # --verbose: the traceback too
    try:
        assert request(server, "POST", "/score", {"tokens": _valid_tokens(model)})[0] == 500
        assert "Traceback" in capsys.readouterr().err
    finally:
        server.verbose = False
    monkeypatch.undo()
    assert request(server, "POST", "/score", {"tokens": _valid_tokens(model)})[0] == 200


def test_short_concurrent_load_has_no_failures(server, model):
    """8 keep-alive clients for 2 s: every answer is 200 and equals the in-process score."""
    tokens = goldens(model)
    expected = model.score(tokens)
    results, stop = [], time.perf_counter() + 2.0

    def client(k):
        c = http.client.HTTPConnection(*address(server), timeout=30)
        n = bad = 0
        while time.perf_counter() < stop:
            i = (k + n) % len(tokens)
            try:
                status, out, _ = request(server, "POST", "/score", {"tokens": tokens[i:i + 1].tolist()}, conn=c)
                bad += status != 200 or abs(out["bits_per_dim"][0] - expected[i]) > 1e-9
            except (OSError, http.client.HTTPException):
                bad += 1
                c = http.client.HTTPConnection(*address(server), timeout=30)
            n += 1
        c.close()
        results.append((n, bad))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert sum(b for _, b in results) == 0
    assert all(n > 0 for n, _ in results)


def test_many_keep_alive_clients_leave_the_loop_asleep_while_tasks_run(model, monkeypatch):
    """100 keep-alive clients, 5 requests each at once: every answer is right, and the server's loop wakes a
    few times per request, not over and over while a worker sends its answer (it did: about 180 wake-ups per
    request, which starved the workers of the GIL, 120 requests/s instead of 2,000 here)."""
    from waitress import wasyncore

    wakeups, poll = [0], wasyncore.poll2

    def counted(*args, **kwargs):
        wakeups[0] += 1
        return poll(*args, **kwargs)

    monkeypatch.setattr(wasyncore, "poll2", counted)
    tokens = goldens(model)[:8]
    expected = model.score(tokens)

    async def client(port: int, k: int) -> list[bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        right = []
        for n in range(5):
            i = (k + n) % len(tokens)
            body = json.dumps({"tokens": tokens[i:i + 1].tolist()}).encode()
            writer.write(b"POST /score HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            status, length = await reader.readline(), 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            out = json.loads(await reader.readexactly(length))
            right.append(status.startswith(b"HTTP/1.1 200") and abs(out["bits_per_dim"][0] - expected[i]) < 1e-9)
        writer.close()
        return right

    async def clients(port: int) -> list[bool]:
        return sum(await asyncio.gather(*(client(port, k) for k in range(100))), [])

    with running(model, Limits()) as srv:
        start = wakeups[0]
        right = asyncio.run(clients(address(srv)[1]))
        per_request = (wakeups[0] - start) / len(right)
    assert len(right) == 500 and all(right)
    assert per_request < 10, per_request


def test_a_burst_of_new_connections_is_not_reset(model):
    """48 clients connect and send before the server accepts any: all get answers (the backlog holds them)."""
    socks, statuses = [], []

    def connect(srv):
        for _ in range(48):
            s = socket.create_connection(address(srv), timeout=30)
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            socks.append(s)

    with running(model, before=connect):
        for s in socks:
            try:
                statuses.append(int(s.recv(64).split()[1]))
            except (OSError, IndexError) as e:
                statuses.append(repr(e))
            s.close()
    assert statuses == [200] * 48, [s for s in statuses if s != 200][:3]


def test_idle_and_slow_clients_starve_no_one(model):
    """300 connections that say nothing and one client sending a header byte per second (slowloris),
    on a server with the default limits: a normal client still gets /healthz and /score. The 1 s bound
    is the acceptance's; these answers take about a millisecond here, a margin of hundreds even on this
    shared, busy host."""
    with running(model, Limits()) as srv:
        idle = [socket.create_connection(address(srv), timeout=30) for _ in range(300)]
        slow, stop = socket.create_connection(address(srv), timeout=30), threading.Event()

        def slowloris():
            for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(1.0):
                    return
                slow.sendall(bytes([byte]))

        threading.Thread(target=slowloris, daemon=True).start()
        try:
            deadline = time.time() + 30  # until the server has accepted them all (not a timed assertion)
            while len(srv.server.active_channels) < 301 and time.time() < deadline:
                time.sleep(0.05)
            assert len(srv.server.active_channels) == 301
            times = {}
            for method, path, body in [("GET", "/healthz", None), ("POST", "/score", {"tokens": _valid_tokens(model)}),
                                       ("GET", "/healthz", None)]:
                t0 = time.perf_counter()
                status, out, _ = request(srv, method, path, body)
                times[f"{method} {path}"] = time.perf_counter() - t0
                assert status == 200, out
            assert max(times.values()) < 1.0, times
            for s in idle + [slow]:  # all still held open (none dropped to make room), the slow one unanswered
                s.setblocking(False)
                with pytest.raises(BlockingIOError):
                    s.recv(1)
        finally:
            stop.set()
            for s in idle + [slow]:
                s.close()


def test_urllib_client(server, model):
    url = server.url
    with urllib.request.urlopen(url + "/healthz", timeout=30) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    req = urllib.request.Request(url + "/score", data=json.dumps({"tokens": _valid_tokens(model, 3)}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        np.testing.assert_allclose(json.loads(r.read())["bits_per_dim"], model.score(goldens(model)[:3]), atol=1e-9)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/nope", timeout=30)
    assert e.value.code == 404 and "no route" in json.loads(e.value.read())["error"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("version", ["--http1.0", "--http1.1"])
def test_curl(server, model, tmp_path, version):
    """Two URLs in one curl run: the second reuses the first's connection (num_connects 0) on both versions."""
    fmt = "\n%{http_code} %{num_connects} %{http_version}\n"
    out = subprocess.run(["curl", "-sS", "--max-time", "60", version, "-H", "Connection: keep-alive", "-w", fmt,
                          server.url + "/healthz", server.url + "/healthz"],
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    versions = {"--http1.0": ("1", "1.0"), "--http1.1": ("1.1",)}[version]  # as curl names the one it spoke
    assert out[1].split()[:2] == ["200", "1"] and out[3].split()[:2] == ["200", "0"], out
    assert out[1].split()[2] in versions and out[3].split()[2] in versions, out
    assert json.loads(out[0])["status"] == "ok"
    (tmp_path / "body.json").write_text(json.dumps({"tokens": _valid_tokens(model, 2)}))
    out = subprocess.run(["curl", "-sS", "--max-time", "60", version, "-H", "Content-Type: application/json",
                          "--data-binary", f"@{tmp_path / 'body.json'}", "-w", fmt, server.url + "/score",
                          server.url + "/nope"], capture_output=True, text=True, timeout=120, check=True).stdout
    lines = out.splitlines()
    np.testing.assert_allclose(json.loads(lines[0])["bits_per_dim"], model.score(goldens(model)[:2]), atol=1e-9)
    assert lines[1].startswith("200 ") and lines[3].startswith("404 ") and json.loads(lines[2])["status"] == 404


@pytest.mark.skipif(shutil.which("ab") is None, reason="ApacheBench (ab, apache2-utils) is not installed")
@pytest.mark.parametrize("keep_alive", [True, False], ids=["ab -k (HTTP/1.0 keep-alive)", "ab"])
def test_apachebench_2000_requests_32_clients(server, model, tmp_path, keep_alive):
    (tmp_path / "body.json").write_text(json.dumps({"tokens": _valid_tokens(model)}))
    cmd = ["ab", "-q", "-n", "2000", "-c", "32", "-s", "60", "-l", "-p", str(tmp_path / "body.json"),
           "-T", "application/json", *(["-k"] if keep_alive else []), server.url + "/score"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    field = lambda name: re.search(rf"^{name}:\s+(\d+)", proc.stdout, re.M)  # noqa: E731
    assert int(field("Complete requests")[1]) == 2000 and int(field("Failed requests")[1]) == 0, proc.stdout
    assert field("Non-2xx responses") is None, proc.stdout
    kept = field("Keep-Alive requests")  # printed by ab -k only
    assert (int(kept[1]) if kept else 0) == (2000 if keep_alive else 0), proc.stdout
    assert request(server, "GET", "/healthz")[0] == 200


def test_bad_limits_are_refused():
    with pytest.raises(runtime.ProjectableEdgeError, match="workers"):
        Limits(workers=0)
    with pytest.raises(runtime.ProjectableEdgeError, match="idle_timeout_s"):
        Limits(idle_timeout_s=0.5)


def _cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "projectable_edge_runtime", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_cli_json_lines_until_sigterm(rt_bundle):
    """--json: stdout is JSON Lines, one document per event; SIGTERM stops it with exit 0."""
    p = _cli(str(rt_bundle), "--port", "0", "--json")
    try:
        hello = json.loads(p.stdout.readline() or "null")
        assert hello and hello["event"] == "serving" and hello["task"] == "tiny-task", p.stderr.read()
        c = http.client.HTTPConnection(*urlsplit(hello["url"]).netloc.split(":"), timeout=30)
        c.request("GET", "/healthz")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["task"]["name"] == "tiny-task"
        c.close()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, err
    (stopped,) = [json.loads(line) for line in out.splitlines()]
    assert stopped["event"] == "stopped" and stopped["requests_served"] == 1 and stopped["url"] == hello["url"]


def test_cli_a_second_signal_while_stopping_under_load_still_exits_0(rt_bundle):
    """Ctrl-C pressed twice (or SIGTERM sent twice) while workers sample: the second signal used to break the
    wait for the workers, and the process aborted inside onnxruntime (SIGABRT). Now it is ignored."""
    p = _cli(str(rt_bundle), "--port", "0", "--json")
    try:
        hello = json.loads(p.stdout.readline() or "null")
        assert hello, p.stderr.read()
        host, port = urlsplit(hello["url"]).netloc.split(":")
        stop = threading.Event()

        def load():
            while not stop.is_set():
                try:
                    c = http.client.HTTPConnection(host, int(port), timeout=10)
                    c.request("POST", "/sample", body=json.dumps({"n": 4, "seed": 1}))
                    c.getresponse().read()
                    c.close()
                except (OSError, http.client.HTTPException):
                    pass

        threads = [threading.Thread(target=load, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            p.send_signal(sig)
            time.sleep(0.01)
        out, err = p.communicate(timeout=60)
        stop.set()
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err, (p.returncode, err[-2000:])
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["stopped"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_a_signal_answers_the_requests_already_read(rt_bundle, sig):
    """SIGTERM or Ctrl-C while requests wait for a worker: each request already read is answered (waitress dropped
    the queued ones, their clients saw the connection close), no new one is taken, and the server exits 0."""
    p = _cli(str(rt_bundle), "--port", "0", "--json", "--workers", "1", "--max-sample", "64")
    try:
        hello = json.loads(p.stdout.readline() or "null")
        assert hello, p.stderr.read()
        conns = [http.client.HTTPConnection(*urlsplit(hello["url"]).netloc.split(":"), timeout=60) for _ in range(8)]
        for i, c in enumerate(conns):
            c.request("POST", "/sample", body=json.dumps({"n": 64, "seed": i}))
        first = conns[0].getresponse()
        assert first.status == 200 and first.getheader("Connection") is None
        p.send_signal(sig)  # one worker, the same work each: the other 7 are still waiting for it
        answers = [c.getresponse() for c in conns[1:]]
        assert [r.status for r in answers] == [200] * 7
        assert all(len(json.loads(r.read())["images"]) == 64 for r in answers)
        assert answers[-1].getheader("Connection") == "close"  # (those answered after the signal)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and "Traceback" not in err and "Canceling" not in err, err[-2000:]
    assert [json.loads(line)["requests_served"] for line in out.splitlines()] == [8]


@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="no dual-stack IPv6 sockets here")
def test_host_unspecified_ipv6_serves_ipv4_clients_too(model):
    """`--host ::` (every address) takes IPv4 clients as well, as `0.0.0.0` does; it used to listen on IPv6
    only (Python's create_server sets IPV6_V6ONLY), so a client of the device's IPv4 address was refused."""
    with running(model, host="::") as srv:
        assert srv.url.startswith("http://[::]:")
        for ip in ("127.0.0.1", "::1"):
            c = http.client.HTTPConnection(ip, address(srv)[1], timeout=30)
            c.request("GET", "/healthz")
            assert c.getresponse().status == 200, ip
            c.close()


@pytest.mark.skipif(sys.platform == "win32", reason="no ulimit")
def test_an_open_file_limit_below_max_connections_is_raised_or_refused(rt_bundle):
    """Under `ulimit -n 128` the default 512 connections used to pass the process's open-file limit: waitress's
    accept() failed (EMFILE) in a busy loop, writing a traceback each time, and the clients past it waited. Now the
    soft limit is raised to what max_connections needs, or, above the hard limit, the server refuses to start."""
    import resource

    def ulimit(soft, hard):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    p = subprocess.Popen([sys.executable, "-m", "projectable_edge_runtime", "serve", str(rt_bundle), "--port", "0",
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=ulimit(128, hard))
    try:
        hello = json.loads(p.stdout.readline() or "null")
        assert hello, p.stderr.read()
        socks = [socket.create_connection(urlsplit(hello["url"]).netloc.split(":"), timeout=30) for _ in range(200)]
        for s in socks:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert all(s.recv(12) == b"HTTP/1.1 200" for s in socks)
        for s in socks:
            s.close()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 0 and "Too many open files" not in err, err[-2000:]
    p = subprocess.Popen([sys.executable, "-m", "projectable_edge_runtime", "serve", str(rt_bundle), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ulimit(128, 128))
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err, err
    assert "max_connections 512 needs 576 open files" in err and "ulimit -n" in err and len(err.splitlines()) == 1


def test_cli_port_in_use_is_one_line_exit_2(rt_bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = _cli(str(rt_bundle), "--port", str(s.getsockname()[1]))
        out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert "cannot listen on 127.0.0.1" in err and "--port" in err and "Traceback" not in err


def test_the_http_library_is_imported_only_by_a_server(rt_bundle):
    """The runtime, its CLI parser and the serve module import without waitress; `serve` without it
    installed says how to install the extra, in one line, exit 2."""
    code = ("import sys; import projectable_edge_runtime, projectable_edge_runtime.commands.serve\n"
            "from projectable_edge_runtime.__main__ import build_parser, main\n"
            "build_parser().parse_args(['serve', 'b']); print('waitress' in sys.modules)\n"
            "sys.modules['waitress'] = None; sys.exit(main(['serve', sys.argv[1], '--port', '0']))")
    proc = subprocess.run([sys.executable, "-c", code, str(rt_bundle)], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False" and proc.returncode == 2, proc.stderr
    assert "projectable-edge-runtime[serve]" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_the_serve_extra_is_declared_for_the_runtime_wheel_and_the_dev_install(tmp_path):
    from projectable_edge.pipeline import wheel
    from projectable_edge.pipeline.cache import StepCache

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["serve"] == [SERVE_REQUIRES] and SERVE_REQUIRES in extras["dev"]
    info = wheel.write_runtime_wheel(tmp_path, StepCache(None), lambda m: None)  # StepCache(None): no caching
    assert info.extras["serve"] == (SERVE_REQUIRES,)  # the manifest's runtime_wheel field
    with zipfile.ZipFile(tmp_path / info.path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "Provides-Extra: serve" in meta
    (req,) = [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist: waitress")]
    assert 'extra == "serve"' in req and ">=3.0.1" in req and "<4" in req, req
    assert not [ln for ln in meta.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln
                and not ln.startswith(("Requires-Dist: numpy", "Requires-Dist: onnxruntime"))]
