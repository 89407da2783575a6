"""Supervision of backend sessions: a thread that restarts a session which stopped making progress.

The engine records, per model, the monotonic time of the last progress while a run is going
(``Engine.stalled(now, limit)``). When a model has been stuck longer than the hang timeout the
supervisor asks the daemon to restart its session (load the same version again and hot-swap). A
session hung inside native code cannot be killed, but new requests stop queueing behind it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Supervisor"]

log = logging.getLogger("edgert.device.supervisor")

#: How often the supervisor looks, as a fraction of the hang timeout, bounded below (s).
CHECK_FRACTION = 0.25
MIN_CHECK_S = 0.05


class Supervisor:
    """Thread that calls ``restart(model)`` for stalled models, at most once per timeout per model."""

    def __init__(
        self,
        stalled: Callable[[float, float], list[str]],
        timeout: float,
        restart: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stalled, self.timeout, self.restart, self.clock = stalled, timeout, restart, clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_restart: dict[str, float] = {}

    def check(self) -> list[str]:
        """One pass: restart stalled models not restarted within the last timeout; returns them."""
        now = self.clock()
        restarted = []
        for model in self.stalled(now, self.timeout):
            last = self._last_restart.get(model)
            if last is not None and now - last < self.timeout:
                continue
            self._last_restart[model] = now
            log.error(
                "backend session looks hung; restarting it", extra={"model": model, "timeout_s": self.timeout}
            )
            try:
                self.restart(model)
            except Exception:
                log.exception("restarting a hung session failed", extra={"model": model})
            restarted.append(model)
        return restarted

    def start(self) -> None:
        """Start the thread (daemonic: it must never keep the process alive)."""
        self._thread = threading.Thread(target=self._run, name="edgert-supervisor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = max(self.timeout * CHECK_FRACTION, MIN_CHECK_S)
        while not self._stop.wait(interval):
            self.check()

    def stop(self) -> None:
        """Stop and join the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
