"""Trace context and the slow-request log over real sockets, against a real daemon (threshold 0)."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.config import parse_config
from edgert.logs import JsonFormatter
from edgert.metrics.tracecontext import parse_traceparent
from edgert.serve import uds_frames as fr
from tests.serve.daemon_harness import MODELS, Running, config_text, start_daemon

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
VALID = f"00-{TRACE}-00f067aa0ba902b7-01"
STAGES = ("total_ms", "admission_ms", "input_ms", "queue_ms", "batch_size", "load_ms", "infer_ms",
          "output_ms", "encode_ms")
WAIT_S = 30.0
MODELS_TOML = f"""
[[models]]
name = "plain"
path = "{MODELS / "digits_small_int8.onnx"}"
[[models]]
name = "batched"
path = "{MODELS / "digits_small_int8.onnx"}"
max_batch_size = 8
max_queue_delay_us = 1000
"""


class _Lines(logging.Handler):
    """Keeps the daemon's log records as the JSON lines journald would get."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(JsonFormatter())
        self.docs: list[dict[str, Any]] = []
        self.docs_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        doc = json.loads(self.format(record))
        with self.docs_lock:
            self.docs.append(doc)

    def wait(self, pred: Any, n: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        while True:
            with self.docs_lock:
                found = [d for d in self.docs if pred(d)]
            if len(found) >= n or time.monotonic() > deadline:
                return found
            time.sleep(0.01)


@pytest.fixture(scope="module")
def lines() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("edgert")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, lines: _Lines) -> Iterator[Running]:
    tmp: Path = tmp_path_factory.mktemp("trace")
    text = config_text(tmp, models=MODELS_TOML).replace("[daemon]\n", "[daemon]\nslow_request_ms = 0\n", 1)
    running = start_daemon(parse_config(text, "test"))
    yield running
    running.stop()


def _http_infer(daemon: Running, model: str, x: np.ndarray, headers: dict[str, str]) -> tuple[int, str]:
    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    conn = http.client.HTTPConnection(*daemon.http, timeout=WAIT_S)
    try:
        headers = {"content-type": "application/json", **headers}
        conn.request("POST", f"/v2/models/{model}/infer", body, headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("traceparent") or ""
    finally:
        conn.close()


def _slow(lines: _Lines, trace_id: str, n: int = 1) -> list[dict[str, Any]]:
    return lines.wait(lambda d: d.get("msg") == "slow request" and d.get("trace_id") == trace_id, n)


def test_traceparent_round_trip_and_every_stage_logged(daemon, lines, digits):
    x, _ = digits
    status, reply = _http_infer(daemon, "batched", x[:2], {"traceparent": VALID})
    assert status == 200
    ctx = parse_traceparent(reply)
    assert ctx is not None and ctx.trace_id == TRACE and ctx.parent_id != "00f067aa0ba902b7"
    (doc,) = _slow(lines, TRACE)
    assert set(STAGES) <= doc.keys()
    assert doc["model"] == "batched" and doc["version"] == "1" and doc["status"] == 200
    assert doc["transport"] == "http" and doc["span_id"] == ctx.parent_id
    assert doc["batch_size"] >= 2 and doc["load_ms"] is None
    assert doc["total_ms"] >= doc["infer_ms"] > 0 and doc["queue_ms"] > 0  # batched: it waited for company


BAD = {
    "garbage": "garbage",
    "ff": f"ff-{TRACE}-00f067aa0ba902b7-01",
    "zero": f"00-{'0' * 32}-00f067aa0ba902b7-01",
    "upper": f"00-{TRACE.upper()}-00f067aa0ba902b7-01",
    "long": "00-" + "a" * 5000,
}


@pytest.mark.parametrize("bad", list(BAD.values()), ids=list(BAD))
def test_malformed_traceparent_is_replaced_never_an_error(daemon, lines, digits, bad):
    x, _ = digits
    status, reply = _http_infer(daemon, "plain", x[:1], {"traceparent": bad})
    assert status == 200
    ctx = parse_traceparent(reply)
    assert ctx is not None and ctx.trace_id != TRACE.upper() and ctx.trace_id != "0" * 32
    assert _slow(lines, ctx.trace_id)


def test_threshold_zero_logs_every_request_each_with_a_new_trace(daemon, lines, digits):
    x, _ = digits
    ids = []
    for i in range(6):
        status, reply = _http_infer(daemon, "plain", x[i : i + 1], {})
        assert status == 200
        ctx = parse_traceparent(reply)
        assert ctx is not None
        ids.append(ctx.trace_id)
    assert len(set(ids)) == 6
    for tid in ids:
        (doc,) = _slow(lines, tid)
        assert set(STAGES) <= doc.keys() and doc["batch_size"] == 1 and doc["queue_ms"] >= 0


def test_a_refused_request_carries_its_trace_into_the_log(daemon, lines, digits):
    x, _ = digits
    status, reply = _http_infer(daemon, "plain", x[:1, :32], {"traceparent": VALID.replace("4bf9", "5bf9")})
    assert status == 400
    tid = "5bf9" + TRACE[4:]
    assert parse_traceparent(reply).trace_id == tid  # type: ignore[union-attr]
    assert lines.wait(lambda d: d.get("msg") == "request refused" and d.get("trace_id") == tid)
    (doc,) = _slow(lines, tid)
    assert doc["status"] == 400


def _socket_call(daemon: Running, meta: dict[str, Any], x: np.ndarray) -> tuple[int, dict[str, Any]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT_S)
        s.connect(daemon.socket)
        s.sendall(b"".join(bytes(b) for b in fr.encode_frame(fr.INFER, meta, {"pixels": x})))
        head = b""
        while len(head) < fr.HEADER.size:
            head += s.recv(fr.HEADER.size - len(head))
        body_len, kind, meta_len = fr.parse_header(head, 1 << 30)
        body = b""
        while len(body) < body_len:
            body += s.recv(body_len - len(body))
    rmeta, _ = fr.decode_body(body, meta_len)
    return kind, rmeta


def test_socket_trace_field_round_trip(daemon, lines, digits):
    x, _ = digits
    kind, meta = _socket_call(daemon, {"m": "plain", "tp": VALID}, x[:1])
    assert kind == fr.OK and parse_traceparent(meta["tp"]).trace_id == TRACE  # type: ignore[union-attr]
    assert _slow(lines, TRACE, 2)[-1]["transport"] == "socket"
    kind, meta = _socket_call(daemon, {"m": "plain"}, x[:1])
    fresh = parse_traceparent(meta["tp"])
    assert kind == fr.OK and fresh is not None and fresh.trace_id != TRACE
    for bad in ("nonsense", 42, None):
        kind, meta = _socket_call(daemon, {"m": "plain", "tp": bad}, x[:1])
        assert kind == fr.OK and parse_traceparent(meta["tp"]) is not None
    kind, meta = _socket_call(daemon, {"m": "plain", "tp": VALID}, x[:1, :32])
    assert kind == fr.ERROR and meta["status"] == 400
    assert parse_traceparent(meta["tp"]).trace_id == TRACE  # type: ignore[union-attr]


@pytest.mark.parametrize("transport", ["unix", "http"])
def test_the_python_client_sends_and_reads_the_trace_context(daemon, digits, transport: str):
    from edgert.client import Client

    x, _ = digits
    url = "unix://" + daemon.socket if transport == "unix" else "http://{}:{}".format(*daemon.http)
    with Client(url) as c:
        c.infer("plain", {"pixels": x[:1]}, traceparent=VALID)
        joined = parse_traceparent(c.last_traceparent)
        c.infer("plain", {"pixels": x[:1]})
        fresh = parse_traceparent(c.last_traceparent)
        bad = VALID + "\r\nx-evil: 1"
        if transport == "http":  # would split the request's header lines: refused before sending
            with pytest.raises(Exception, match="one line"):
                c.infer("plain", {"pixels": x[:1]}, traceparent=bad)
        else:  # a JSON field: the daemon ignores the malformed context and starts a new trace
            c.infer("plain", {"pixels": x[:1]}, traceparent=bad)
            replaced = parse_traceparent(c.last_traceparent)
            assert replaced is not None and replaced.trace_id != TRACE
    assert joined is not None and joined.trace_id == TRACE
    assert fresh is not None and fresh.trace_id != TRACE
