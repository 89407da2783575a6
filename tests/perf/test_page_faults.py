"""Regression guard: a large JSON request must not page-fault its buffers in afresh on every request.

Measured 2026-12 (issue 10): the daemon spent 8.5 ms decoding a 1.6 MB MobileNetV2 JSON request that
decodes in 4.2 ms in a plain process, because glibc handed the freed parse buffers back to the OS
after every request (its automatic heap trim and mmap thresholds), so the next request faulted ~1,700
pages in again. The daemon now fixes the thresholds (serve/memory.py ``tune_allocator``) and returns
memory after bursts with its own debounced ``malloc_trim``. Counted in page faults, not time.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from edgert.serve import memory

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "models" / "mobilenetv2_int8.onnx"
REQUESTS = 30
#: Minor page faults per request, averaged after warm-up. Measured: ~1,750 before, ~40 after.
MAX_FAULTS_PER_REQUEST = 400
READY_TIMEOUT_S = 60.0

pytestmark = pytest.mark.skipif(not memory.trim_available(), reason="glibc malloc tunables only")


def _minflt(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[7])  # field 10 of stat(5): minflt (fields after "state" start at index 0)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_large_json_requests_do_not_fault_their_buffers_in_every_time(tmp_path: Path) -> None:
    port = _port()
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(f"""
[daemon]
state_dir = "{tmp_path / "state"}"
allow_plaintext = true
log_level = "warning"
[http]
listen = "127.0.0.1:{port}"
[metrics]
listen = ""
[socket]
path = ""
[[models]]
name = "mobilenet"
path = "{MODEL}"
max_batch_size = 0
""")
    proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "-c", str(cfg)],
                            env=dict(os.environ), stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while True:
            try:
                conn.request("GET", "/v2/health/ready")
                ready = conn.getresponse()
                ready.read()
                if ready.status == 200:
                    break
            except OSError:
                conn.close()
            assert time.monotonic() < deadline, "daemon did not become ready"
            time.sleep(0.1)
        x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
        body = orjson.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                         "data": x.ravel()}]}, option=orjson.OPT_SERIALIZE_NUMPY)

        def infer() -> None:
            conn.request("POST", "/v2/models/mobilenet/infer", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()[:300]
            resp.read()

        for _ in range(5):  # warm-up: first sessions runs, allocator thresholds settle
            infer()
        before = _minflt(proc.pid)
        for _ in range(REQUESTS):
            infer()
        per_request = (_minflt(proc.pid) - before) / REQUESTS
        conn.close()
        assert per_request < MAX_FAULTS_PER_REQUEST, f"{per_request:.0f} page faults per request"
    finally:
        proc.terminate()
        proc.wait(30)
