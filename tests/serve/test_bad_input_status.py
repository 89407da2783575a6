"""Issue 9 D8: malformed HTTP and socket inputs are a 400 naming the problem, never a 500.

Also: a HEAD response carries headers only, so a keep-alive connection stays in sync.
"""

from __future__ import annotations

import http.client
import json
import socket

import numpy as np
import pytest

from edgert.serve import uds_frames as fr
from tests.serve.daemon_harness import Running

pytestmark = pytest.mark.integration

HUGE = 4611686018427387904  # 2**62


def post(served: Running, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """POST on a fresh connection; returns (status, JSON body)."""
    conn = http.client.HTTPConnection(*served.http, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def socket_call(served: Running, kind: int, meta: dict, tensors: dict | None = None) -> tuple[int, dict]:
    """One raw frame over the socket; returns (reply kind, reply meta)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(served.socket)
        s.sendall(b"".join(bytes(b) for b in fr.encode_frame(kind, meta, tensors)))
        head = b""
        while len(head) < fr.HEADER.size:
            head += s.recv(fr.HEADER.size - len(head))
        body_len, reply_kind, meta_len = fr.parse_header(head, 1 << 30)
        body = b""
        while len(body) < body_len:
            body += s.recv(body_len - len(body))
        return reply_kind, json.loads(body[:meta_len])


@pytest.mark.parametrize(
    "shape",
    [[0, HUGE, HUGE], [0, 2**31, 2**31], [0, 2**63 - 1]],
    ids=["2^62 x 2^62", "2^31 x 2^31", "2^63-1"],
)
def test_http_empty_tensor_with_unrepresentable_shape_is_400(served: Running, shape: list[int]) -> None:
    doc = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": shape, "data": []}]}
    status, body = post(served, "/v2/models/digits-small/infer", json.dumps(doc).encode(),
                        {"content-type": "application/json"})
    assert status == 400, body
    assert "shape" in body["error"]


def test_http_binary_empty_tensor_with_unrepresentable_shape_is_400(served: Running) -> None:
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [0, HUGE, HUGE],
                                     "parameters": {"binary_data_size": 0}}]}).encode()
    status, body = post(served, "/v2/models/digits-small/infer", header,
                        {"inference-header-content-length": str(len(header))})
    assert status == 400, body
    assert "shape" in body["error"]


@pytest.mark.parametrize(
    "value", ["\u00b3", "\u0663", "9" * 5000], ids=["superscript 3", "arabic 3", "5000 digits"]
)
def test_http_non_ascii_or_huge_inference_header_length_is_400(served: Running, value: str) -> None:
    body = b'{"inputs": []}'
    conn = http.client.HTTPConnection(*served.http, timeout=30)
    try:
        conn.putrequest("POST", "/v2/models/digits-small/infer")
        conn.putheader("Inference-Header-Content-Length", value.encode("utf-8") if ord(value[0]) > 255
                       else value.encode("latin-1"))
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        status, doc = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 400, doc
    assert "Inference-Header-Content-Length" in doc["error"]


@pytest.mark.parametrize(
    "outputs", [5, [{"a": 1}], "logits", [None]], ids=["int", "object", "string", "null"]
)
def test_socket_infer_with_malformed_output_list_is_400(served: Running, outputs: object) -> None:
    x = np.zeros((1, 64), np.float32)
    kind, doc = socket_call(served, fr.INFER, {"m": "digits-small", "o": outputs}, {"pixels": x})
    assert kind == fr.ERROR and doc["status"] == 400, doc
    assert "'o'" in doc["error"]


@pytest.mark.parametrize("version", [{"a": 1}, [1], 1.5], ids=["object", "list", "float"])
def test_socket_infer_with_malformed_version_is_400(served: Running, version: object) -> None:
    x = np.zeros((1, 64), np.float32)
    kind, doc = socket_call(served, fr.INFER, {"m": "digits-small", "v": version}, {"pixels": x})
    assert kind == fr.ERROR and doc["status"] == 400, doc
    assert "'v'" in doc["error"]


def test_socket_empty_tensor_with_unrepresentable_shape_is_400(served: Running) -> None:
    meta = {"m": "digits-small", "t": [["pixels", "FP32", [0, HUGE, HUGE]]]}
    kind, doc = socket_call(served, fr.INFER, meta)
    assert kind == fr.ERROR and doc["status"] == 400, doc
    assert "shape" in doc["error"]


def test_socket_valid_output_list_still_works(served: Running) -> None:
    x = np.zeros((2, 64), np.float32)
    kind, doc = socket_call(served, fr.INFER, {"m": "digits-small", "o": ["logits"]}, {"pixels": x})
    assert kind == fr.OK, doc
    assert [t[0] for t in doc["t"]] == ["logits"]


def test_head_response_has_no_body_and_keep_alive_stays_in_sync(served: Running) -> None:
    with socket.create_connection(served.http, timeout=30) as s:
        s.sendall(b"HEAD /v2/health/ready HTTP/1.1\r\nhost: x\r\n\r\n"
                  b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n")
        reader = s.makefile("rb")
        status_line = reader.readline()
        headers = {}
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        assert status_line.startswith(b"HTTP/1.1 200"), status_line
        assert int(headers["content-length"]) > 0  # HEAD reports the length a GET would have
        # No body follows: the next bytes are the GET's status line.
        second = reader.readline()
        assert second.startswith(b"HTTP/1.1 200"), second
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        assert json.loads(reader.read(int(headers["content-length"]))) == {"live": True}
