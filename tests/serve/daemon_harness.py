"""Harness: a real daemon (real models, real sockets) in a background thread of the test process."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgert.config import DaemonConfig
from edgert.device import Daemon

MODELS = Path(__file__).resolve().parents[2] / "models"
START_TIMEOUT_S = 60.0


@dataclass
class Running:
    """A started daemon and where to reach it."""

    daemon: Daemon
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    error: list[BaseException]

    @property
    def http(self) -> tuple[str, int]:
        host, _, port = self.daemon.addresses["http"].rpartition(":")
        return host, int(port)

    @property
    def http_url(self) -> str:
        return "http://" + self.daemon.addresses["http"]

    @property
    def socket(self) -> str:
        return str(self.daemon.addresses["socket"])

    def call(self, coro: object, timeout: float = 60.0) -> object:
        """Run a coroutine on the daemon's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.request_stop)
        self.thread.join(60)
        assert not self.thread.is_alive()


def config_text(tmp: Path, extra_http: str = "", models: str | None = None) -> str:
    """A plaintext-model config on free loopback ports and a socket under ``tmp``."""
    models = (
        models
        if models is not None
        else f"""
[[models]]
name = "digits-small"
path = "{MODELS / "digits_small_int8.onnx"}"
[[models]]
name = "digits-large"
path = "{MODELS / "digits_large_int8.onnx"}"
[[cascades]]
name = "digits"
small = "digits-small"
large = "digits-large"
threshold = 0.9
"""
    )
    return f"""
[daemon]
profile = "cpu-generic"
allow_plaintext = true
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
{extra_http}
[metrics]
listen = "127.0.0.1:0"
[socket]
path = "{tmp / "edgert.sock"}"
{models}
"""


def start_daemon(cfg: DaemonConfig, **kwargs: object) -> Running:
    """Start ``cfg`` in a thread (uvloop, as in production) and wait until it is ready."""
    import uvloop

    daemon = Daemon(cfg, **kwargs)  # type: ignore[arg-type]
    loop = uvloop.new_event_loop()
    error: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(daemon.run(signals=False))
        except BaseException as exc:
            error.append(exc)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=run, name="test-daemon")
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not daemon.is_ready:
        if error:
            thread.join()
            raise error[0]
        assert time.monotonic() < deadline, "daemon did not become ready"
        time.sleep(0.01)
    return Running(daemon, loop, thread, error)
