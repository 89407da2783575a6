"""`edgert trace tail` on the log lines of a real `edgert daemon` subprocess (slow_request_ms = 0)."""

from __future__ import annotations

import http.client
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from tests.device.subproc import MODELS, READY_TIMEOUT_S, cli, free_port

pytestmark = pytest.mark.integration

WAIT_S = 30.0


def _trace(n: int) -> str:
    return f"{n:032x}"


def _start_logged(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """``edgert daemon`` with its JSON log lines (stderr) going to ``log``, as journald would keep them."""
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            with Client(f"unix://{config.parent / 'edgert.sock'}") as c:
                if c.ready():
                    return proc
        except Exception:
            pass
        assert time.monotonic() < deadline, "daemon did not become ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    tmp = tmp_path_factory.mktemp("tail")
    port = free_port()
    config = tmp / "edgert.toml"
    config.write_text(f"""
[daemon]
profile = "cpu-generic"
allow_plaintext = true
slow_request_ms = 0
[http]
listen = "127.0.0.1:{port}"
[metrics]
listen = ""
[socket]
path = "{tmp / "edgert.sock"}"
[[models]]
name = "digits"
path = "{MODELS / "digits_small_int8.onnx"}"
""")
    log = tmp / "daemon.log"
    proc = _start_logged(config, log)
    yield port, log
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT_S) == 0


def _infer(port: int, trace_id: str) -> None:
    x = np.load(MODELS / "digits_test.npz")["x"][:1]
    body = json.dumps({"inputs": [{"name": "pixels", "shape": [1, 64], "datatype": "FP32",
                                   "data": x.ravel().tolist()}]})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    try:
        headers = {"content-type": "application/json", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
        conn.request("POST", "/v2/models/digits/infer", body, headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
        assert trace_id in (resp.getheader("traceparent") or "")
    finally:
        conn.close()


def test_tail_reads_a_log_file_and_stdin(daemon):
    port, log = daemon
    ids = [_trace(0xA1 + i) for i in range(3)]
    for tid in ids:
        _infer(port, tid)
    r = cli("trace", "tail", str(log))
    assert r.returncode == 0, r.stderr
    shown = [line for line in r.stdout.splitlines() if any(t in line for t in ids)]
    assert len(shown) == 3 and all("digits@1" in line and "infer" in line for line in shown)
    one = cli("trace", "tail", str(log), "--json", "--trace-id", ids[1])
    (line,) = one.stdout.splitlines()
    doc = json.loads(line)
    assert doc["trace_id"] == ids[1] and doc["model"] == "digits" and doc["batch_size"] == 1
    assert cli("trace", "tail", str(log), "--model", "other").stdout == ""
    piped = subprocess.run([sys.executable, "-m", "edgert.cli.main", "trace", "tail", "-n", "2"],
                           input=log.read_text(), capture_output=True, text=True, timeout=WAIT_S)
    assert piped.returncode == 0 and len(piped.stdout.splitlines()) == 2


def test_tail_follows_new_lines(daemon):
    port, log = daemon
    tid = _trace(0xF0110)
    proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "trace", "tail", "-f", str(log),
                             "--trace-id", tid], stdout=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    out = proc.stdout
    assert out is not None
    threading.Thread(target=lambda: [lines.put(x) for x in out], daemon=True).start()
    try:
        _infer(port, tid)
        got = lines.get(timeout=WAIT_S)
        assert tid in got
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
        out.close()
