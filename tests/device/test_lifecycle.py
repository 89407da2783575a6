"""The real daemon as a subprocess: sd_notify READY/WATCHDOG, SIGHUP reload, SIGTERM drain, hot swap."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from tests.device.subproc import stop_daemon

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"
READY_TIMEOUT_S = 60


def write_config(tmp: Path, models: str) -> Path:
    path = tmp / "edgert.toml"
    path.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{tmp / "state"}"
allow_plaintext = true
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{tmp / "edgert.sock"}"
mode = "0600"
{models}
""")
    return path


def recv_until(sock: socket.socket, word: bytes, timeout: float) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msg = sock.recv(4096)
        except TimeoutError:
            break
        got.append(msg)
        if word in msg:
            return got
    raise AssertionError(f"no {word!r} within {timeout} s; got {got}")


@pytest.fixture
def notify_socket():
    """An abstract-namespace datagram socket standing in for systemd's notify socket."""
    name = f"edgert-test-{os.getpid()}-{time.monotonic_ns()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    yield "@" + name, sock
    sock.close()


def start(config: Path, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_ready_watchdog_reload_and_drain(tmp_path, notify_socket):
    name, nsock = notify_socket
    small = f'[[models]]\nname = "digits-small"\npath = "{MODELS / "digits_small_int8.onnx"}"\n'
    large = f'[[models]]\nname = "digits-large"\npath = "{MODELS / "digits_large_int8.onnx"}"\n'
    config = write_config(tmp_path, small)
    proc = start(config, {"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "200000"})
    try:
        msgs = recv_until(nsock, b"READY=1", READY_TIMEOUT_S)
        assert any(b"MAINPID=%d" % proc.pid in m for m in msgs)
        recv_until(nsock, b"WATCHDOG=1", 2)  # every 0.1 s (half of WATCHDOG_USEC)
        x = np.load(MODELS / "digits_test.npz")["x"][:4]
        with Client(f"unix://{tmp_path / 'edgert.sock'}") as c:
            assert c.models() == ["digits-small"]
            assert c.infer("digits-small", {"pixels": x})["logits"].shape == (4, 10)
            # SIGHUP: the config now also lists digits-large
            config.write_text(config.read_text() + large)
            proc.send_signal(signal.SIGHUP)
            recv_until(nsock, b"RELOADING=1", 10)
            recv_until(nsock, b"READY=1", 30)
            assert c.models() == ["digits-large", "digits-small"]
            # a broken config on SIGHUP keeps the running one
            config.write_text("[daemon\n")
            proc.send_signal(signal.SIGHUP)
            recv_until(nsock, b"READY=1", 30)
            assert c.infer("digits-large", {"pixels": x})["logits"].shape == (4, 10)
        code, err = stop_daemon(proc)
        assert code == 0, err[-2000:]
        assert "config reload failed" in err
        assert not (tmp_path / "edgert.sock").exists()
    finally:
        stop_daemon(proc)


def test_sigterm_drains_in_flight_requests(tmp_path):
    """A request sent before SIGTERM and still running when it arrives gets its full answer."""
    # MobileNetV2 at batch 8 takes tens of ms a run here, so requests are in flight at any instant.
    model = f'[[models]]\nname = "m"\npath = "{MODELS / "mobilenetv2_int8.onnx"}"\n'
    config = write_config(tmp_path, model)
    proc = start(config, {})
    sock_path = tmp_path / "edgert.sock"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                with Client(f"unix://{sock_path}") as c:
                    if c.ready():
                        break
            except Exception:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "daemon did not start"
            time.sleep(0.05)
        x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
        with Client(f"unix://{sock_path}") as c:
            expected = c.infer("m", {"input": x})["logits"]
        # (sent, answered, outcome) per request, on the monotonic clock
        results: list[tuple[float, float, object]] = []
        warm = threading.Barrier(5)

        def worker() -> None:
            with Client(f"unix://{sock_path}") as c:
                c.infer("m", {"input": x})
                warm.wait()
                while True:
                    sent = time.monotonic()
                    try:
                        out = c.infer("m", {"input": x})["logits"]
                        outcome: object = bool(np.allclose(out, expected, atol=1e-4))
                    except Exception as exc:  # after the drain the daemon refuses or closes: stop
                        results.append((sent, time.monotonic(), type(exc).__name__))
                        return
                    results.append((sent, time.monotonic(), outcome))

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        warm.wait()
        time.sleep(0.2)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        _, err = proc.communicate(timeout=30)
        code = proc.returncode
        assert code == 0, err.decode()[-2000:]
        # proof that requests were in flight at SIGTERM: sent before it, answered (correctly) after it
        in_flight = [r for r in results if r[0] < signalled < r[1]]
        assert in_flight, results
        assert all(r[2] is True for r in in_flight if not isinstance(r[2], str)), in_flight
        assert any(r[2] is True for r in in_flight), in_flight
        # every failure is a clean refusal/close after draining began, never a half-written answer
        assert all(r[2] in (True, "OverloadedError", "ServeError") for r in results), results
    finally:
        stop_daemon(proc)
