"""Issue 13: `python -m projectable_edge_runtime serve` — real HTTP requests against a live server.

Every malformed request gets a 4xx with a JSON error and the server keeps serving; valid requests
return exactly what the runtime computes in-process; a short concurrent load has no failures.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import projectable_edge_runtime as runtime
from projectable_edge_runtime.serve import Limits, make_server

LIMITS = Limits(max_body_bytes=64 * 1024, max_batch=8, max_sample=4, workers=2, max_connections=16,
                idle_timeout_s=5.0)


@pytest.fixture(scope="module")
def model(rt_bundle):
    with runtime.load(rt_bundle) as m:
        yield m


@pytest.fixture(scope="module")
def server(model):
    srv = make_server(model, "127.0.0.1", 0, LIMITS)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def request(srv, method, path, body=None, headers=None, conn=None):
    """One request; returns (status, parsed JSON body, headers)."""
    c = conn or http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
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


def test_healthz(server, model):
    status, out, _ = request(server, "GET", "/healthz")
    assert status == 200 and out["status"] == "ok"
    assert out["task"] == model.task and out["variant"] == model.variant
    assert out["image_shape"] == [8, 8] and out["seq_len"] == model.seq_len
    assert out["limits"]["max_batch"] == LIMITS.max_batch


@pytest.mark.parametrize("form", ["tokens", "images", "npy-images", "npy-tokens"])
def test_score_equals_the_runtime_in_process(server, model, form):
    tokens = goldens(model)[:5]
    images = model.decode_images(tokens)
    body, headers = {
        "tokens": ({"tokens": tokens.tolist()}, {}),
        "images": ({"images": images.tolist()}, {"Content-Type": "application/json"}),
        "npy-images": (npy(images), {"Content-Type": "application/x-npy"}),
        "npy-tokens": (npy(tokens.astype(np.int32)), {"Content-Type": "application/x-npy"}),
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


def _valid_tokens(model, n=1):
    return goldens(model)[:n].tolist()


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
    ("npy: not an array", "POST", "/score", b"not numpy", {"Content-Type": "application/x-npy"}, 400, ".npy"),
    ("npy: float dtype", "POST", "/score", npy(np.zeros((1, 64), np.float32)),
     {"Content-Type": "application/x-npy"}, 400, "dtype"),
    ("npy: wrong shape", "POST", "/score", npy(np.zeros((1, 9, 9), np.uint8)),
     {"Content-Type": "application/x-npy"}, 400, "shape"),
    ("npy: a scalar", "POST", "/score", npy(np.uint8(5)), {"Content-Type": "application/x-npy"}, 400, "shape"),
    ("npy: too many images", "POST", "/score", npy(np.zeros((9, 8, 8), np.uint8)),
     {"Content-Type": "application/x-npy"}, 413, "at most"),
    ("sample: n too large", "POST", "/sample", {"n": 5}, {}, 413, "1..4"),
    ("sample: n zero", "POST", "/sample", {"n": 0}, {}, 400, "1..4"),
    ("sample: n not an integer", "POST", "/sample", {"n": "two"}, {}, 400, "integer"),
    ("sample: negative temperature", "POST", "/sample", {"n": 1, "temperature": -1}, {}, 400, "temperature"),
    ("sample: NaN temperature", "POST", "/sample", b'{"n": 1, "temperature": NaN}', {}, 400, "temperature"),
    ("sample: top_k too large", "POST", "/sample", {"n": 1, "top_k": 1000}, {}, 400, "top_k"),
    ("sample: negative seed", "POST", "/sample", {"n": 1, "seed": -3}, {}, 400, "seed"),
    ("sample: npy body", "POST", "/sample", npy(np.zeros(1)), {"Content-Type": "application/x-npy"}, 415,
     "Content-Type"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_request_is_a_json_4xx_and_the_server_keeps_serving(server, model, case):
    name, method, path, body, headers, want, word = case
    status, out, _ = request(server, method, path, body, headers)
    assert status == want, out
    assert out["status"] == want and word in out["error"], out
    status, out, _ = request(server, "POST", "/score", {"tokens": _valid_tokens(model)})
    assert status == 200 and len(out["bits_per_dim"]) == 1


def test_keep_alive_connection_stays_in_step_after_errors(server, model):
    """Errors on a reused connection (bodies read or refused) never desynchronise the next request."""
    c = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
    for body, want in [({"tokens": [[0, 1]]}, 400), (b"{bad", 400), ({"tokens": _valid_tokens(model)}, 200)]:
        assert request(server, "POST", "/score", body, conn=c)[0] == want
    assert request(server, "POST", "/nope", {"tokens": 1}, conn=c)[0] == 404  # body read even when unrouted
    assert request(server, "GET", "/healthz", conn=c)[0] == 200
    c.close()


def raw(srv, data: bytes) -> tuple[int, dict]:
    """Send raw bytes (what http.client refuses to send) and parse the one response."""
    with socket.create_connection(srv.server_address[:2], timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        resp = b""
        while chunk := s.recv(65536):
            resp += chunk
    head, _, body = resp.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("data, want", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\n\r\n", 400),
    (b"POST /score HTTP/1.1\r\nContent-Length: ten\r\n\r\n", 400),
    (b"POST /score HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"tokens\": ", 400),
    (b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
    (b"POST /score HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n", 413),
], ids=["bad request line", "unsupported HTTP version", "bad Content-Length", "truncated body", "chunked",
        "body far over the limit (not read)"])
def test_protocol_errors_are_json_4xx(server, model, data, want):
    status, out = raw(server, data)
    assert status == want and "error" in out
    assert request(server, "GET", "/healthz")[0] == 200


def test_a_stalled_body_is_a_408_not_a_500(model):
    srv = make_server(model, "127.0.0.1", 0, Limits(idle_timeout_s=0.5))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        with socket.create_connection(srv.server_address[:2], timeout=10) as s:
            s.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"tokens\"")  # then nothing
            head, _, body = s.recv(65536).partition(b"\r\n\r\n")
        assert int(head.split()[1]) == 408 and "did not arrive" in json.loads(body)["error"]
        assert request(srv, "GET", "/healthz")[0] == 200
    finally:
        srv.shutdown()
        srv.server_close()


def test_an_internal_fault_is_a_500_and_the_server_keeps_serving(server, model, monkeypatch):
    def broken(x):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.service.model, "score", broken)
    status, out, _ = request(server, "POST", "/score", {"tokens": _valid_tokens(model)})
    assert status == 500 and "boom" in out["error"]
    monkeypatch.undo()
    assert request(server, "POST", "/score", {"tokens": _valid_tokens(model)})[0] == 200


def test_short_concurrent_load_has_no_failures(server, model):
    """8 keep-alive clients for 2 s: every answer is 200 and equals the in-process score."""
    tokens = goldens(model)
    expected = model.score(tokens)
    results, stop = [], time.perf_counter() + 2.0

    def client(k):
        c = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
        n = bad = 0
        while time.perf_counter() < stop:
            i = (k + n) % len(tokens)
            try:
                status, out, _ = request(server, "POST", "/score", {"tokens": tokens[i:i + 1].tolist()}, conn=c)
                bad += status != 200 or abs(out["bits_per_dim"][0] - expected[i]) > 1e-9
            except (OSError, http.client.HTTPException):
                bad += 1
                c = http.client.HTTPConnection(*server.server_address[:2], timeout=10)
            n += 1
        c.close()
        results.append((n, bad))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 8
    assert sum(b for _, b in results) == 0
    assert all(n > 0 for n, _ in results)


def test_a_burst_of_new_connections_is_not_reset(model):
    """48 clients connect and send before the server accepts any: all get answers (the backlog holds them)."""
    srv = make_server(model, "127.0.0.1", 0, Limits(max_connections=64, idle_timeout_s=5.0))
    socks, refused = [], None
    try:
        for _ in range(48):
            try:  # beyond a small backlog, connect() stalls: fail fast rather than wait it out
                s = socket.create_connection(srv.server_address[:2], timeout=2)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            except OSError as e:
                refused = repr(e)
                break
            socks.append(s)
        thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        statuses = []
        for s in socks:
            try:
                statuses.append(int(s.recv(64).split()[1]))
            except (OSError, IndexError) as e:
                statuses.append(repr(e))
    finally:
        for s in socks:
            s.close()
        srv.shutdown()
        srv.server_close()
    assert refused is None and statuses == [200] * 48, (refused, [s for s in statuses if s != 200][:3])


def test_connections_beyond_the_pool_get_503_at_once(model):
    srv = make_server(model, "127.0.0.1", 0, Limits(max_connections=2, idle_timeout_s=5.0))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        held = [http.client.HTTPConnection(*srv.server_address[:2], timeout=10) for _ in range(2)]
        for c in held:  # two keep-alive connections occupy both slots
            assert request(srv, "GET", "/healthz", conn=c)[0] == 200
        status, out, r = request(srv, "GET", "/healthz")
        assert status == 503 and "busy" in out["error"] and r.getheader("Retry-After") == "1"
        held[0].close()
        deadline = time.time() + 5
        while (status := request(srv, "GET", "/healthz")[0]) == 503 and time.time() < deadline:
            time.sleep(0.05)
        assert status == 200
        held[1].close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_limits_are_refused():
    with pytest.raises(runtime.ProjectableEdgeError, match="workers"):
        Limits(workers=0)


def _cli(*args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "projectable_edge_runtime", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_cli_serves_until_sigterm(rt_bundle):
    p = _cli(str(rt_bundle), "--port", "0", "--json")
    try:
        line = p.stdout.readline()
        assert line.startswith("serving task tiny-task"), line + p.stderr.read()
        host, port = line.split("http://")[1].split()[0].split(":")
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request("GET", "/healthz")
        r = c.getresponse()
        assert r.status == 200 and json.loads(r.read())["task"]["name"] == "tiny-task"
        c.close()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert json.loads(out)["requests_served"] == 1


def test_cli_port_in_use_is_one_line_exit_2(rt_bundle):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        p = _cli(str(rt_bundle), "--port", str(s.getsockname()[1]))
        out, err = p.communicate(timeout=60)
    assert p.returncode == 2, err
    assert "cannot listen on 127.0.0.1" in err and "--port" in err and "Traceback" not in err
