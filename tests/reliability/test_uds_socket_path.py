"""Issue 8 item 8: a second daemon on the same socket path must refuse to start, and must not delete
the first daemon's socket. Both daemons are the real ``edgert daemon`` in subprocesses.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgert.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = Path(__file__).resolve().parents[2] / "models"
READY_TIMEOUT_S = 60.0


def write_config(directory: Path, sock: Path) -> Path:
    """A plaintext digits daemon on a free port, serving on ``sock``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "edgert.toml"
    path.write_text(f"""
[daemon]
profile = "cpu-generic"
allow_plaintext = true
state_dir = "{directory / "state"}"
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{sock}"
mode = "0600"
[[models]]
name = "digits-small"
path = "{MODELS / "digits_small_int8.onnx"}"
""")
    return path


def start(config: Path) -> subprocess.Popen[bytes]:
    """``edgert daemon --config``; stderr goes to a file beside the config."""
    with open(config.parent / "stderr.log", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)


def wait_ready_or_exit(proc: subprocess.Popen[bytes], log: Path) -> str:
    """'exited' or 'ready' (the daemon logged that it is ready), whichever comes first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return "exited"
        if b"daemon ready" in log.read_bytes():
            return "ready"
        time.sleep(0.05)
    raise AssertionError("daemon neither became ready nor exited")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait (kill after 30 s)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def socket_answers(sock: Path) -> bool:
    """A READY frame on ``sock`` is answered."""
    try:
        with Client(f"unix://{sock}", timeout=10) as c:
            return bool(c.ready())
    except Exception:
        return False


def test_second_daemon_on_the_same_socket_refuses_and_leaves_the_first_alone(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "edgert.sock"
    first = start(write_config(tmp_path / "a", sock))
    try:
        assert wait_ready_or_exit(first, tmp_path / "a" / "stderr.log") == "ready"
        assert socket_answers(sock)
        second = start(write_config(tmp_path / "b", sock))
        try:
            outcome = wait_ready_or_exit(second, tmp_path / "b" / "stderr.log")
        finally:
            stop(second)  # before the fix it ran; stopping it deleted the first daemon's socket
        err = (tmp_path / "b" / "stderr.log").read_text()
        assert sock.exists() and socket_answers(sock), f"the first daemon lost its socket ({outcome=})"
        assert outcome == "exited", "the second daemon started on a socket path that is in use"
        assert second.returncode != 0
        assert f"another edgert daemon is serving on {sock}: stop it or set [socket] path" in err
    finally:
        stop(first)
    assert not sock.exists(), "the first daemon removes its own socket when it stops"


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    import socket

    sock = tmp_path / "edgert.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # a socket file nobody listens on, as a killed daemon leaves it
    stale.close()
    proc = start(write_config(tmp_path / "a", sock))
    try:
        assert wait_ready_or_exit(proc, tmp_path / "a" / "stderr.log") == "ready"
        assert socket_answers(sock)
    finally:
        stop(proc)
