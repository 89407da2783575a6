"""OIP v2 REST against a real daemon on a loopback port: happy paths, the binary extension, bad input."""

from __future__ import annotations

import http.client
import json
import re
import resource
import socket
import threading
import time

import numpy as np
import psutil
import pytest

from edgert.client import Client

pytestmark = pytest.mark.integration


def request(served, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):
    """One request with the stdlib client (independent of ours); returns (status, headers, body)."""
    host, port = served.http
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def infer_json(served, model: str, doc: dict, ctype: str = "application/json"):
    return request(
        served, "POST", f"/v2/models/{model}/infer", json.dumps(doc).encode(), {"Content-Type": ctype}
    )


def raw(served, data: bytes, wait: float = 5.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or ``wait`` passes)."""
    with socket.create_connection(served.http, timeout=wait) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_health_metadata_and_index(served):
    assert request(served, "GET", "/v2/health/live")[0] == 200
    assert request(served, "GET", "/v2/health/ready")[0] == 200
    status, _, body = request(served, "GET", "/v2")
    assert status == 200 and json.loads(body)["name"] == "edgert"
    status, _, body = request(served, "GET", "/v2/models/digits-small")
    meta = json.loads(body)
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 64]}]
    assert meta["platform"] == "onnxruntime_onnx"
    assert request(served, "GET", "/v2/models/digits-small/versions/1")[0] == 200
    assert request(served, "GET", "/v2/models/digits-small/ready")[0] == 200
    status, _, body = request(served, "POST", "/v2/repository/index")
    assert {m["name"] for m in json.loads(body)} == {"digits", "digits-small", "digits-large"}


def test_json_infer_matches_in_process(served, digits):
    x, _ = digits
    doc = {
        "id": "req-42",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [3, 64], "data": x[:3].ravel().tolist()}],
    }
    status, _, body = infer_json(served, "digits-small", doc)
    assert status == 200, body
    out = json.loads(body)
    assert out["id"] == "req-42" and out["model_name"] == "digits-small" and out["model_version"] == "1"
    got = np.array(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
    want = served.daemon.engine.infer_sync("digits-small", {"pixels": x[:3]}).outputs["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_nested_data_and_other_dtypes_are_converted(served, digits):
    x, _ = digits
    doc = {
        "inputs": [
            {"name": "pixels", "datatype": "FP64", "shape": [2, 64], "data": x[:2].astype(float).tolist()}
        ]
    }
    status, _, body = infer_json(served, "digits-small", doc)
    # FP64 is a valid OIP type; the model takes FP32, so the runtime either converts or refuses clearly.
    assert status in (200, 400), body
    if status == 400:
        assert "pixels" in json.loads(body)["error"]


def test_binary_extension_both_ways(served, digits):
    x, _ = digits
    payload = np.ascontiguousarray(x[:5]).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": [5, 64],
                    "parameters": {"binary_data_size": len(payload)},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
        }
    ).encode()
    status, headers, body = request(
        served,
        "POST",
        "/v2/models/digits-large/infer",
        header + payload,
        {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert status == 200, body
    hlen = int(headers["inference-header-content-length"])
    doc = json.loads(body[:hlen])
    size = doc["outputs"][0]["parameters"]["binary_data_size"]
    got = np.frombuffer(body[hlen : hlen + size], np.float32).reshape(5, 10)
    want = served.daemon.engine.infer_sync("digits-large", {"pixels": x[:5]}).outputs["logits"]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_cascade_and_our_client_over_http(served, digits):
    x, y = digits
    with Client(served.http_url) as c:
        logits = c.infer("digits", {"pixels": x[:32]}, request_id="abc")["logits"]
        assert logits.shape == (32, 10)
        assert (logits.argmax(1) == y[:32]).mean() > 0.85
        assert c.ready() and c.ready("digits")
        assert set(c.models()) == {"digits", "digits-small", "digits-large"}


BAD = [
    ("malformed json", b"{not json", "application/json", 400, "not valid JSON"),
    ("json nesting bomb", b'{"inputs": ' + b"[" * 200_000, "application/json", 400, "not valid JSON"),
    ("wrong content type", b"{}", "application/x-www-form-urlencoded", 415, "content type"),
    ("no inputs", b'{"inputs": []}', "application/json", 400, "inputs"),
    (
        "bytes refused",
        json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}
        ).encode(),
        "application/json",
        400,
        "BYTES",
    ),
    (
        "unknown datatype",
        json.dumps({"inputs": [{"name": "pixels", "datatype": "FP8", "shape": [1], "data": [1]}]}).encode(),
        "application/json",
        400,
        "datatype",
    ),
    (
        "data too short",
        json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 63}]}
        ).encode(),
        "application/json",
        400,
        "63",
    ),
    (
        "data too long",
        json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 65}]}
        ).encode(),
        "application/json",
        400,
        "65",
    ),
    (
        "shape mismatch",
        json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 32], "data": [1.0] * 64}]}
        ).encode(),
        "application/json",
        400,
        "pixels",
    ),
    (
        "datatype mismatch",
        json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": ["x"] * 64}]}
        ).encode(),
        "application/json",
        400,
        "FP32",
    ),
    (
        "wrong input name",
        json.dumps(
            {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 64], "data": [1.0] * 64}]}
        ).encode(),
        "application/json",
        400,
        "pixels",
    ),
    (
        "huge declared shape",
        json.dumps(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [10**12, 10**12], "data": [1.0]}]}
        ).encode(),
        "application/json",
        400,
        "declares more data",
    ),
]


@pytest.mark.parametrize(("case", "body", "ctype", "status", "fragment"), BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_clear_errors(served, case, body, ctype, status, fragment):
    got, _, resp = request(served, "POST", "/v2/models/digits-small/infer", body, {"Content-Type": ctype})
    assert got == status, resp
    assert fragment in json.loads(resp)["error"]
    assert request(served, "GET", "/v2/health/ready")[0] == 200  # still serving


def test_unknown_model_and_version_are_404(served, digits):
    x, _ = digits
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x[0].tolist()}]}
    status, _, body = infer_json(served, "nope", doc)
    assert status == 404 and "nope" in json.loads(body)["error"]
    status, _, body = request(
        served,
        "POST",
        "/v2/models/digits-small/versions/9/infer",
        json.dumps(doc).encode(),
        {"Content-Type": "application/json"},
    )
    assert status == 404 and "9" in json.loads(body)["error"]
    assert request(served, "GET", "/v2/models/nope")[0] == 404
    assert request(served, "GET", "/v2/nothing")[0] == 404
    assert request(served, "GET", "/v2/models/digits-small/infer")[0] == 405


def test_binary_length_mismatch(served):
    payload = np.zeros((1, 64), np.float32).tobytes()
    for declared, sent in ((256, payload[:200]), (256, payload + b"xx"), (100, payload)):
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 64],
                        "parameters": {"binary_data_size": declared},
                    }
                ]
            }
        ).encode()
        status, _, body = request(
            served,
            "POST",
            "/v2/models/digits-small/infer",
            header + sent,
            {"Inference-Header-Content-Length": str(len(header))},
        )
        assert status == 400, body
        assert "binary" in json.loads(body)["error"]
    status, _, body = request(
        served, "POST", "/v2/models/digits-small/infer", b"{}", {"Inference-Header-Content-Length": "999"}
    )
    assert status == 400 and "larger than" in json.loads(body)["error"]


def test_huge_content_length_refused_before_reading(served):
    proc = psutil.Process()
    before = proc.memory_info().rss
    resp = raw(
        served,
        b"POST /v2/models/digits-small/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000\r\n\r\n{",
    )
    assert resp.startswith(b"HTTP/1.1 413")
    assert proc.memory_info().rss - before < 50 * 1024 * 1024


def test_oversized_headers_and_garbage(served):
    resp = raw(served, b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 431")
    assert raw(served, b"\x16\x03\x01garbage-not-http\r\n\r\n").startswith(b"HTTP/1.1 400")


def test_slowloris_is_cut_off(served):
    """A client that trickles its headers is answered 408 and closed after read_timeout_s (0.5 s here)."""
    with socket.create_connection(served.http, timeout=10) as s:
        s.sendall(b"POST /v2/models/digits-small/infer HTTP/1.1\r\nHost: x\r\n")
        got = b""
        for _ in range(40):  # keep trickling; the server must not wait for us forever
            try:
                s.sendall(b"X-a: b\r\n")
            except OSError:
                break
            time.sleep(0.1)
            s.settimeout(0.01)
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                continue
            got += chunk
            if not chunk or b"408" in got:
                break
        assert b"408" in got
    assert request(served, "GET", "/v2/health/live")[0] == 200


def test_client_disconnecting_mid_request(served, digits):
    x, _ = digits
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x[0].tolist()}]}
    ).encode()
    for cut in (10, len(body) // 2):
        with socket.create_connection(served.http) as s:
            s.sendall(
                b"POST /v2/models/digits-small/infer HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:cut]
            )
    # a complete request whose client leaves before the answer
    with socket.create_connection(served.http) as s:
        s.sendall(
            b"POST /v2/models/digits-small/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % len(body)
            + body
        )
    time.sleep(0.2)
    status, _, _ = infer_json(served, "digits-small", json.loads(body))
    assert status == 200


@pytest.mark.slow
def test_thousand_concurrent_connections_and_rss_returns(served, digits):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    x, _ = digits
    body = json.dumps(
        {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": x[0].tolist()}]}
    ).encode()
    req = (
        b"POST /v2/models/digits-small/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    proc = psutil.Process()

    def burst() -> int:
        socks = [socket.create_connection(served.http, timeout=30) for _ in range(1000)]
        try:
            for s in socks:
                s.sendall(req)
            ok = 0
            for s in socks:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += s.recv(65536)
                ok += data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.1 503")
            return ok
        finally:
            for s in socks:
                s.close()

    assert burst() == 1000
    time.sleep(0.5)
    baseline = proc.memory_info().rss
    for _ in range(3):
        assert burst() == 1000
    time.sleep(0.5)
    grown = proc.memory_info().rss - baseline
    assert grown < 30 * 1024 * 1024, f"RSS grew {grown / 1e6:.1f} MB over 3 bursts"
    assert request(served, "GET", "/v2/health/ready")[0] == 200


def test_pipelined_requests_answered_in_order(served):
    reqs = b"".join(
        b"GET /v2/models/%s HTTP/1.1\r\nHost: x\r\n\r\n" % n for n in (b"digits-small", b"nope", b"digits")
    )
    with socket.create_connection(served.http, timeout=5) as s:
        s.sendall(reqs)
        data = b""
        while data.count(b"HTTP/1.1 ") < 3 or not data.endswith(b"}"):
            data += s.recv(65536)
    statuses = re.findall(rb"HTTP/1\.1 (\d+)", data)
    assert statuses == [b"200", b"404", b"200"]


def test_metrics_endpoint(served, digits):
    x, _ = digits
    with Client(served.http_url) as c:
        c.infer("digits-small", {"pixels": x[:1]})
    host, _, port = served.daemon.addresses["metrics"].rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    conn.request("GET", "/metrics")
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    assert resp.status == 200 and 'edgert_requests_total{model="digits-small"}' in text


def test_concurrent_threads_through_our_client(served, digits):
    x, _ = digits
    want = served.daemon.engine.infer_sync("digits-small", {"pixels": x[:8]}).outputs["logits"]
    failures: list[BaseException] = []

    def worker(url: str) -> None:
        try:
            with Client(url) as c:
                for _ in range(50):
                    np.testing.assert_allclose(
                        c.infer("digits-small", {"pixels": x[:8]})["logits"], want, rtol=1e-6
                    )
        except BaseException as exc:
            failures.append(exc)

    threads = [
        threading.Thread(target=worker, args=(u,)) for u in [served.http_url, "unix://" + served.socket] * 4
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def test_python_client_keeps_the_http_connection_alive(served, digits) -> None:
    """One TCP connection for many calls (the response parser's keep-alive flag is read in time)."""
    from edgert.client import Client

    x, _ = digits
    with Client(served.http_url) as c:
        c.infer("digits-small", {"pixels": x[:1]})
        first = c._http.sock
        assert first is not None
        for i in range(5):
            c.infer("digits-small", {"pixels": x[i : i + 1]})
        assert c._http.sock is first
