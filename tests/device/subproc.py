"""Helpers: the real daemon and the real CLI as subprocesses, on a state dir with device keys."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from edgert.client import Client

MODELS = Path(__file__).resolve().parents[2] / "models"
READY_TIMEOUT_S = 60.0
CLI_TIMEOUT_S = 120.0


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_store_config(tmp: Path, state: Path, models: list[str], http_port: int = 0) -> Path:
    """A daemon config serving ``models`` from the encrypted store under ``state``."""
    entries = "".join(f'[[models]]\nname = "{m}"\n' for m in models)
    path = tmp / "edgert.toml"
    path.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{state}"
drain_timeout_s = 5
[http]
listen = "127.0.0.1:{http_port}"
[metrics]
listen = ""
[socket]
path = "{tmp / "edgert.sock"}"
mode = "0600"
{entries}""")
    return path


def start_daemon(config: Path) -> subprocess.Popen[bytes]:
    """``edgert daemon --config`` as a subprocess; returns once it answers ready on its socket."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    sock = config.parent / "edgert.sock"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError("daemon exited: " + proc.communicate()[1].decode()[-2000:])
        try:
            with Client(f"unix://{sock}") as c:
                if c.ready():
                    return proc
        except Exception:
            pass
        if time.monotonic() > deadline:
            stop_daemon(proc)
            raise AssertionError("daemon did not become ready")
        time.sleep(0.05)


def stop_daemon(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    """SIGTERM, wait; returns (exit code, stderr)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err.decode(errors="replace")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``edgert ARGS`` (the real entry point) and capture its output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "edgert.cli.main", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, env=env)
