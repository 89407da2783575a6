"""A bounded in-memory tail of the process's own ``edgert.*`` log lines, for ``collect-logs``.

The daemon logs JSON lines to stderr for journald; reading journald back needs privileges and a
running systemd, so the sync service keeps the last lines itself. Lines are formatted with the
same JSON formatter, so they carry no secrets or tensor contents beyond what the logs already have.
"""

from __future__ import annotations

import collections
import logging
import threading

__all__ = ["LOG_RING_LINES", "LogRing"]

#: Lines kept in memory (about 200 bytes each: well under 1 MB).
LOG_RING_LINES = 1000
MAX_LINE_CHARS = 2000


class LogRing(logging.Handler):
    """A logging handler that keeps the last ``capacity`` formatted records."""

    def __init__(self, capacity: int = LOG_RING_LINES, level: int = logging.INFO) -> None:
        super().__init__(level)
        from edgert.logs import JsonFormatter

        self.setFormatter(JsonFormatter())
        self._lines: collections.deque[str] = collections.deque(maxlen=capacity)
        self._ring_lock = threading.Lock()
        self._attached: logging.Logger | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Format and keep one record (never raises into the logging caller)."""
        try:
            line = self.format(record)[:MAX_LINE_CHARS]
        except Exception:
            self.handleError(record)
            return
        with self._ring_lock:
            self._lines.append(line)

    def tail(self, n: int) -> list[str]:
        """The last ``n`` lines, oldest first."""
        with self._ring_lock:
            lines = list(self._lines)
        return lines[-n:] if n > 0 else []

    def attach(self, logger_name: str = "edgert") -> None:
        """Start collecting the records of ``logger_name`` and its children."""
        if self._attached is None:
            self._attached = logging.getLogger(logger_name)
            self._attached.addHandler(self)

    def detach(self) -> None:
        """Stop collecting (idempotent)."""
        if self._attached is not None:
            self._attached.removeHandler(self)
            self._attached = None
