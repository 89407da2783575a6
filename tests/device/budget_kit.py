"""Helpers for memory-budget tests: a store of many models, a config, and raw HTTP/socket infer calls
that return the reply's headers or fields (the cold-load report) as well as the outputs."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

import numpy as np

from edgert.serve import uds_frames as fr
from tests.device.subproc import MODELS

DIGITS = MODELS / "digits_large_fp32.onnx"
MOBILENET = MODELS / "mobilenetv2_int8.onnx"
COLD_HEADER = "x-edgert-cold-load-ms"


def install(state: Path, models: dict[str, Path]) -> None:
    """Create device keys under ``state`` and install each model (name -> file) into the store."""
    from edgert.device.importing import import_plaintext
    from edgert.security.loader import open_keystore, open_store

    store = open_store(state, open_keystore(state, create=True))
    for name, path in models.items():
        import_plaintext(store, path, name=name, version="1")


def write_config(tmp: Path, state: Path, budget_mb: float, models: list[dict[str, Any]], http_port: int,
                 metrics_port: int = 0) -> Path:
    """A daemon config with ``[daemon] memory_budget_mb`` and ``models`` (dicts of [[models]] keys)."""
    def value(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    entries = "".join("[[models]]\n" + "".join(f"{k} = {value(v)}\n" for k, v in m.items()) for m in models)
    metrics = f"127.0.0.1:{metrics_port}" if metrics_port else ""
    path = tmp / "edgert.toml"
    path.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{state}"
drain_timeout_s = 5
log_level = "warning"  # the churn logs at info; nothing reads stderr until the end
memory_budget_mb = {budget_mb}
[http]
listen = "127.0.0.1:{http_port}"
[metrics]
listen = "{metrics}"
[socket]
path = "{tmp / 'edgert.sock'}"
mode = "0600"
{entries}""")
    return path


def digits_inputs(rows: int = 1, offset: int = 0) -> np.ndarray:
    """Rows of the held-out digits set."""
    return np.load(MODELS / "digits_test.npz")["x"][offset:offset + rows]


def http_infer(port: int, model: str, x: np.ndarray) -> tuple[int, dict[str, str], Any]:
    """POST one JSON infer request; (status, lower-cased headers, parsed body)."""
    body = json.dumps({"inputs": [{"name": "pixels", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        doc = json.loads(resp.read())
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc
    finally:
        conn.close()


def http_get(port: int, path: str) -> tuple[int, Any]:
    """GET ``path``; (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        raw = resp.read()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw.decode()
    finally:
        conn.close()


def http_logits(doc: dict[str, Any]) -> np.ndarray:
    """The logits of a JSON infer response."""
    (out,) = [o for o in doc["outputs"] if o["name"] == "logits"]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def socket_infer(path: Path, model: str, x: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One INFER frame over the Unix socket; (reply meta, outputs); an ERROR reply comes back as its meta."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)
        s.connect(str(path))
        s.sendall(b"".join(bytes(b) for b in fr.encode_frame(fr.INFER, {"m": model}, {"pixels": x})))
        head = _recv(s, fr.HEADER.size)
        body_len, kind, meta_len = fr.parse_header(head, 1 << 26)
        body = _recv(s, body_len)
    meta, data = fr.decode_body(body, meta_len)
    if kind == fr.ERROR:
        return meta, {}
    return meta, fr.decode_tensors(meta, data, meta_len)


def _recv(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the daemon closed the socket")
        buf += chunk
    return bytes(buf)


def metric_values(port: int, family: str) -> dict[str, float]:
    """``edgert_<family>{model="..."}`` values from /metrics, by model."""
    status, text = http_get(port, "/metrics")
    assert status == 200
    out = {}
    for line in str(text).splitlines():
        if line.startswith(f"edgert_{family}{{model="):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('model="', 1)[1].split('"', 1)[0]] = float(value)
    return out
