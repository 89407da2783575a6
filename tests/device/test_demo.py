"""`edgert demo` end to end: a real subprocess, raw HTTP (urllib), our client over the socket, SIGTERM.

Checks the demo serves the encrypted sample models and the cascade, exits cleanly, and leaves no
plaintext model bytes anywhere under its HOME or TMPDIR.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
READY_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 30.0
#: A window of model bytes searched for on disk: any plaintext copy would contain it.
PROBE_BYTES = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, doc: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(doc).encode() if doc is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def wait_ready(proc: subprocess.Popen[bytes], sock: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"demo exited early with {proc.returncode}"
        if sock.exists():
            try:
                with Client(f"unix://{sock}", timeout=5) as c:
                    if c.ready():
                        return
            except Exception:  # not listening yet
                pass
        time.sleep(0.05)
    raise AssertionError("edgert demo did not become ready")


def plaintext_probes() -> list[bytes]:
    """Byte windows from the middle of each bundled model served by the demo."""
    probes = []
    for name in ("digits_small_int8.onnx", "digits_large_int8.onnx"):
        data = (MODELS / name).read_bytes()
        mid = len(data) // 2
        probes.append(data[mid : mid + PROBE_BYTES])
    return probes


def files_containing(root: Path, probes: list[bytes]) -> list[Path]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(p in data for p in probes):
                hits.append(path)
    return hits


def test_demo_serves_encrypted_models_and_exits_clean(tmp_path: Path):
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    sock = tmp_path / "demo.sock"
    port = free_port()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmpdir), "XDG_STATE_HOME": str(home / "state")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgert.cli.main",
            "demo",
            "--http",
            f"127.0.0.1:{port}",
            "--socket",
            str(sock),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_ready(proc, sock)
        data = np.load(MODELS / "digits_test.npz")
        x, y = data["x"][:16], data["y"][:16]
        base = f"http://127.0.0.1:{port}"

        # raw HTTP, as the printed curl commands do
        status, meta = http_json(f"{base}/v2/models/digits")
        assert status == 200 and meta["name"] == "digits"
        doc = {
            "id": "1",
            "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [16, 64], "data": x.ravel().tolist()}],
        }
        for model in ("digits", "digits-small", "digits-large"):
            status, out = http_json(f"{base}/v2/models/{model}/infer", doc)
            assert status == 200, out
            assert out["id"] == "1" and out["outputs"][0]["shape"] == [16, 10]
            pred = np.array(out["outputs"][0]["data"]).reshape(16, 10).argmax(1)
            assert (pred == y).mean() >= 0.85
        status, err = http_json(f"{base}/v2/models/nope/infer", doc)
        assert status == 404 and "nope" in err["error"]

        # the Python client over the socket, including the cascade
        with Client(f"unix://{sock}") as c:
            assert set(c.models()) == {"digits", "digits-small", "digits-large", "tones"}
            logits = c.infer("digits", {"pixels": x})["logits"]
            assert (logits.argmax(1) == y).mean() >= 0.85
            status = c.status()
            assert status is not None

        # the models really are in the encrypted store while serving
        assert not files_containing(home, plaintext_probes())
        assert not files_containing(tmpdir, plaintext_probes())
        served_stores = list(tmpdir.glob("edgert-demo-*"))
        assert served_stores, "the demo store should live under TMPDIR"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"edgert demo is serving" in out
    assert not sock.exists(), "the socket file should be removed on exit"
    assert not list(tmpdir.glob("edgert-demo-*")), "the temporary store should be removed on exit"
    assert not files_containing(tmp_path, plaintext_probes()), "plaintext model bytes left on disk"
    assert b"Traceback" not in err


def test_demo_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    """`edgert demo --http 0.0.0.0:PORT` used to serve the world with no token and no warning."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "edgert.cli.main", "demo", "--http", "0.0.0.0:0", "--socket",
         str(tmp_path / "demo.sock"), "--metrics", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing to serve HTTP on the non-loopback address '0.0.0.0:0' without a bearer token" in r.stderr
    assert "--http 127.0.0.1:8000" in r.stderr
    assert not (tmp_path / "demo.sock").exists()


def test_busy_metrics_port_names_the_metrics_option(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "edgert.cli.main", "demo", "--http", "127.0.0.1:0", "--socket",
             str(tmp_path / "demo.sock"), "--metrics", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "metrics.listen" in r.stderr and "--metrics HOST:PORT" in r.stderr
    assert "--http" not in r.stderr.split("hint:", 1)[1]
