"""A real daemon (digits models) plus a Unix-socket server with its default limits, in its own process.

Run as ``python tests/reliability/serve_proc.py DIR``. It prints one JSON line
``{"pid", "http", "socket"}`` once both listeners answer, then serves until SIGTERM. The tests
measure this process's RSS (psutil) while they abuse it from the test process, so the client's
memory never mixes with the server's.

The socket server is built here with ``UdsServer(backend)`` rather than by the daemon so that it runs
with the server's own default limits (what the daemon passes once its config is wired to them).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

MODELS = Path(__file__).resolve().parents[2] / "models"


def config_text(tmp: Path) -> str:
    """Both digits models on a free loopback port; the daemon's own socket is off."""
    return f"""
[daemon]
profile = "cpu-generic"
allow_plaintext = true
drain_timeout_s = 5
state_dir = "{tmp / "state"}"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = ""
[[models]]
name = "digits-small"
path = "{MODELS / "digits_small_int8.onnx"}"
[[models]]
name = "digits-large"
path = "{MODELS / "digits_large_int8.onnx"}"
"""


async def main(tmp: Path) -> None:
    """Run the daemon; once it is ready, add the socket server and announce the addresses."""
    from edgert.config import parse_config
    from edgert.device import Daemon
    from edgert.serve.uds import UdsServer

    daemon = Daemon(parse_config(config_text(tmp), "serve_proc"), build_sync=False)
    uds = UdsServer(daemon.backend)
    sock = tmp / "edgert.sock"
    started: list[asyncio.Task[None]] = []

    async def announce() -> None:
        await uds.start(sock, mode=0o600)
        print(json.dumps({"pid": os.getpid(), "http": daemon.addresses["http"], "socket": str(sock)}),
              flush=True)

    def on_ready(_daemon: object) -> None:
        started.append(asyncio.get_running_loop().create_task(announce()))

    try:
        await daemon.run(on_ready)  # SIGTERM drains and returns
    finally:
        await uds.stop()



# ---- test side: spawn the process above, measure it, stop it ------------------------------------
READY_TIMEOUT_S = 60.0
#: How long a settling wait may take before the test gives up (never an assertion on its own).
SETTLE_TIMEOUT_S = 60.0


class ServeProc:
    """The server process seen from a test: addresses, RSS, readiness, stop."""

    def __init__(self, tmp: Path) -> None:
        import subprocess

        self.log = tmp / "server.log"
        with open(self.log, "wb") as err:  # a file, not a pipe: a chatty server must never block on it
            self.proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(tmp)], stdout=subprocess.PIPE, stderr=err
            )
        import selectors

        sel = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        if not sel.select(READY_TIMEOUT_S):
            self.stop()
            raise AssertionError("server process did not become ready")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError("server process exited: " + self.stop()[-2000:])
        info = json.loads(line)
        host, _, port = info["http"].rpartition(":")
        self.http = (host, int(port))
        self.socket: str = info["socket"]
        import psutil

        self.ps = psutil.Process(info["pid"])

    def rss_mb(self) -> float:
        """The server's resident set size in MB."""
        return float(self.ps.memory_info().rss) / 1e6

    def settle(self) -> float:
        """Wait until the server stops using CPU (it has consumed what it was sent); returns its RSS."""
        import time

        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        last = sum(self.ps.cpu_times()[:2])
        quiet = 0
        while quiet < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
            now = sum(self.ps.cpu_times()[:2])
            quiet = quiet + 1 if now - last < 0.02 else 0
            last = now
        return self.rss_mb()

    def http_ready(self) -> bool:
        """GET /v2/health/ready on a fresh connection answers 200."""
        import http.client

        conn = http.client.HTTPConnection(*self.http, timeout=30)
        try:
            conn.request("GET", "/v2/health/ready")
            return conn.getresponse().status == 200
        finally:
            conn.close()

    def socket_ready(self) -> bool:
        """A READY frame on a fresh socket connection answers ready."""
        from edgert.client import Client

        with Client(f"unix://{self.socket}", timeout=30) as c:
            return bool(c.ready())

    def stop(self) -> str:
        """SIGTERM, wait (kill after 30 s); returns the server's log."""
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
        return self.log.read_text(errors="replace")



#: Give up sending once the peer has accepted nothing for this long while using no CPU: it stopped
#: reading (back-pressure), rather than being busy with what it already read.
STALL_S = 2.0
#: Bound on one flood, whatever happens.
FLOOD_TIMEOUT_S = 180.0


def flood(sock: Any, payload: bytes, total: int, proc: ServeProc, peak: list[float]) -> int:
    """Send ``payload`` repeatedly (``total`` bytes at most) without reading; returns bytes sent.

    Stops early when the server stops reading (it accepts nothing for STALL_S while idle) or closes
    the connection. Samples the server's RSS into ``peak`` as it goes.
    """
    import select
    import time

    reps = max(1, (1 << 16) // len(payload))  # 64 KiB sends: larger ones stall on AF_UNIX
    block = memoryview(payload * reps)
    sock.setblocking(False)
    sent = 0
    since_sample = 0
    deadline = time.monotonic() + FLOOD_TIMEOUT_S
    while sent < total and time.monotonic() < deadline:
        cpu = sum(proc.ps.cpu_times()[:2])
        _, writable, _ = select.select([], [sock], [], STALL_S)
        if not writable:
            if sum(proc.ps.cpu_times()[:2]) - cpu < 0.05:
                break  # idle and not reading: back-pressure
            continue  # still busy with what it read
        try:
            n = sock.send(block[: min(len(block), total - sent)])
        except (BrokenPipeError, ConnectionResetError):
            break
        except BlockingIOError:
            continue
        sent += n
        since_sample += n
        if since_sample >= 1 << 20:
            peak.append(proc.rss_mb())
            since_sample = 0
    peak.append(proc.rss_mb())
    return sent


def wait_rss_below(proc: ServeProc, limit_mb: float) -> float:
    """Poll the server's RSS until it is at most ``limit_mb`` (bounded); returns the last value."""
    import time

    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    rss = proc.rss_mb()
    while rss > limit_mb and time.monotonic() < deadline:
        time.sleep(0.25)
        rss = proc.rss_mb()
    return rss


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(Path(sys.argv[1])))
