"""Pipeline benchmark: MobileNetV2 pre/post-processing on the server vs done by the client, side by side.

One daemon process serves ``mobilenetv2`` (float32 [N, 3, 224, 224] -> 1,000 logits) and the pipeline
``mnv2-top5`` (uint8 [N, H, W, 3] frames -> top-5 indices and scores; docs/pipelines.md). For each
transport (OIP HTTP JSON, OIP HTTP binary extension, the Unix socket) and frame size, requests are
interleaved one by one:

- **pipeline**: send the uint8 frame, receive the top-5;
- **client**: resize/scale/normalize/transpose in numpy, send float32 CHW, receive 1,000 logits, then
  softmax and top-5 in numpy.

Latency is end to end (frame in hand -> top-5 in hand, including the client's numpy and codec work).
Bytes are counted on the wire (request + response, headers and framing included). Requests are built
and parsed by hand here so every byte is counted.

    python tools/bench_pipeline.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_serving import free_port

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
FRAMES = {"240x320": (1, 240, 320, 3), "224x224": (1, 224, 224, 3)}
READY_TIMEOUT_S = 120.0
WARMUP = 5

CONFIG = """
[daemon]
profile = "cpu-generic"
allow_plaintext = true
log_level = "warning"
[http]
listen = "127.0.0.1:{port}"
[metrics]
listen = ""
[socket]
path = "{sock}"
[[models]]
name = "mobilenetv2"
path = "{model}"
[[pipelines]]
name = "mnv2-top5"
input = {{ name = "frame", dtype = "uint8", shape = [-1, -1, -1, 3] }}
stages = [
  {{ op = "resize", height = 224, width = 224 }},
  {{ op = "transpose", layout = "NHWC->NCHW" }},
  {{ op = "scale", factor = 0.00392156862745098 }},
  {{ op = "normalize", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225], axis = 1 }},
  {{ op = "model", model = "mobilenetv2" }},
  {{ op = "softmax" }},
  {{ op = "topk", k = 5 }},
]
"""


# -- the client-side stages ---------------------------------------------------------------------------
def preprocess(frames: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW 224x224: bilinear (half-pixel centres), /255, ImageNet mean/std."""
    x = frames.astype(np.float32)
    for axis in (1, 2):
        n = x.shape[axis]
        if n != 224:
            pos = np.clip((np.arange(224) + 0.5) * n / 224 - 0.5, 0, n - 1)
            lo = np.floor(pos).astype(int)
            hi = np.minimum(lo + 1, n - 1)
            w = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(4)])
            a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
            x = a + (b - a) * w
    x = (x * np.float32(1 / 255) - np.array(MEAN, np.float32)) * (1 / np.array(STD)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def postprocess(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax, then the 5 largest (largest first)."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :5]
    return idx, np.take_along_axis(p, idx, axis=1)


# -- wire codecs (hand-built, so that every byte is counted) -------------------------------------------
DTYPES = {"UINT8": np.uint8, "FP32": np.float32, "INT64": np.int64}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class Http:
    """One keep-alive HTTP/1.1 connection that counts the bytes it sends and receives."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.sent = self.received = 0

    def call(self, path: str, body: bytes, headers: str) -> tuple[dict[str, str], bytes]:
        req = (f"POST {path} HTTP/1.1\r\nHost: bench\r\n{headers}Content-Length: {len(body)}\r\n\r\n"
               ).encode() + body
        self.sock.sendall(req)
        self.sent += len(req)
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
                head = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
                n = int(head["content-length"])
                if len(self.buf) >= end + 4 + n:
                    body = bytes(self.buf[end + 4:end + 4 + n])
                    del self.buf[:end + 4 + n]
                    self.received += end + 4 + n
                    if not lines[0].split()[1].startswith("2"):
                        raise RuntimeError(f"{lines[0]}: {body[:300]!r}")
                    return head, body
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def json_infer(self, model: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """OIP JSON both ways."""
        body = json.dumps({"inputs": [{"name": name, "datatype": NAMES[x.dtype], "shape": list(x.shape),
                                       "data": x.ravel().tolist()}]}).encode()
        _, resp = self.call(f"/v2/models/{model}/infer", body, "Content-Type: application/json\r\n")
        doc = json.loads(resp)
        return {o["name"]: np.asarray(o["data"], DTYPES[o["datatype"]]).reshape(o["shape"])
                for o in doc["outputs"]}

    def binary_infer(self, model: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """OIP binary tensor extension both ways."""
        header = json.dumps({"inputs": [{"name": name, "datatype": NAMES[x.dtype], "shape": list(x.shape),
                                         "parameters": {"binary_data_size": x.nbytes}}],
                             "parameters": {"binary_data_output": True}}).encode()
        head, resp = self.call(f"/v2/models/{model}/infer", header + x.tobytes(),
                               f"Inference-Header-Content-Length: {len(header)}\r\n"
                               "Content-Type: application/octet-stream\r\n")
        hlen = int(head.get("inference-header-content-length", len(resp)))
        doc = json.loads(resp[:hlen])
        out, offset = {}, hlen
        for o in doc["outputs"]:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(resp, DTYPES[o["datatype"]], size // np.dtype(DTYPES[o["datatype"]]
                                                                                         ).itemsize,
                                           offset).reshape(o["shape"])
            offset += size
        return out


class Uds:
    """One Unix-socket connection (edgert frames) that counts the bytes it sends and receives."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sent = self.received = 0

    def _exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("closed")
            got += k
        return buf

    def infer(self, model: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
        """One INFER frame and its reply."""
        from edgert.serve import uds_frames as fr

        buffers = fr.encode_frame(fr.INFER, {"m": model}, {name: x})
        data = b"".join(bytes(b) for b in buffers)
        self.sock.sendall(data)
        self.sent += len(data)
        header = self._exact(fr.HEADER.size)
        body_len, kind, meta_len = fr.parse_header(header, 1 << 40)
        body = self._exact(body_len)
        self.received += fr.HEADER.size + body_len
        meta, payload = fr.decode_body(body, meta_len)
        if kind == fr.ERROR:
            raise RuntimeError(str(meta.get("error")))
        return {k: np.array(v) for k, v in fr.decode_tensors(meta, payload, meta_len).items()}


# -- the run -------------------------------------------------------------------------------------------
def start(tmp: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port, sock = free_port(), str(tmp / "edgert.sock")
    cfg = tmp / "edgert.toml"
    cfg.write_text(CONFIG.format(port=port, sock=sock, model=MODELS / "mobilenetv2_int8.onnx"))
    proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "-c", str(cfg)],
                            env=dict(os.environ))
    deadline = time.monotonic() + READY_TIMEOUT_S
    from edgert.client import Client

    while time.monotonic() < deadline:
        try:
            with Client(f"unix://{sock}") as c:
                if c.ready():
                    return proc, port, sock
        except Exception:
            time.sleep(0.05)
    proc.terminate()
    raise RuntimeError("daemon not ready")


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q) * 1e3)


def measure(call: Callable[[str, str, np.ndarray], dict[str, np.ndarray]], conn: Any, frame: np.ndarray,
            n: int) -> dict[str, Any]:
    """Interleave pipeline and client-side requests; return latency and bytes per request for each."""
    lat: dict[str, list[float]] = {"pipeline": [], "client": []}
    wire: dict[str, list[int]] = {"pipeline": [0, 0], "client": [0, 0]}
    for i in range(n + WARMUP):
        for mode in ("pipeline", "client"):
            sent, received = conn.sent, conn.received
            t = time.perf_counter()
            if mode == "pipeline":
                out = call("mnv2-top5", "frame", frame)
                top = out["indices"], out["scores"]
            else:
                top = postprocess(call("mobilenetv2", "input", preprocess(frame))["logits"])
            elapsed = time.perf_counter() - t
            if i >= WARMUP:
                lat[mode].append(elapsed)
                wire[mode][0] += conn.sent - sent
                wire[mode][1] += conn.received - received
            assert top[0].shape == (1, 5)
    doc: dict[str, Any] = {}
    for mode in ("pipeline", "client"):
        doc[mode] = {"request_bytes": wire[mode][0] // n, "response_bytes": wire[mode][1] // n,
                     "p50_ms": round(pct(lat[mode], 50), 2), "p99_ms": round(pct(lat[mode], 99), 2)}
    p, c = doc["pipeline"], doc["client"]
    doc["bytes_ratio"] = round((p["request_bytes"] + p["response_bytes"]) /
                               (c["request_bytes"] + c["response_bytes"]), 4)
    doc["p50_ratio"] = round(p["p50_ms"] / c["p50_ms"], 3)
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument("--requests", type=int, default=0, help="requests per mode and case")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()
    n = args.requests or (20 if args.quick else 150)
    report: dict[str, Any] = {"requests": n, "cpus": os.cpu_count(), "results": {}}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, sock = start(Path(tmp))
        try:
            http, uds = Http(port), Uds(sock)
            for size, shape in FRAMES.items():
                frame = rng.integers(0, 256, shape, dtype=np.uint8)
                for transport, conn, call in (("http_json", http, http.json_infer),
                                              ("http_binary", http, http.binary_infer),
                                              ("socket", uds, uds.infer)):
                    jn = max(10, n // 5) if transport == "http_json" else n  # JSON of 150k floats is slow
                    report["results"][f"{transport}/{size}"] = measure(call, conn, frame, jn)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{'case':<22} {'mode':<9} {'req B':>9} {'resp B':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for case, doc in report["results"].items():
        for mode in ("pipeline", "client"):
            d = doc[mode]
            print(f"{case:<22} {mode:<9} {d['request_bytes']:>9} {d['response_bytes']:>8} "
                  f"{d['p50_ms']:>8} {d['p99_ms']:>8}")
        print(f"{'':<22} pipeline/client: bytes x{doc['bytes_ratio']}, p50 x{doc['p50_ratio']}")
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
