"""Per-model stream metrics: open streams, items dropped, lag of the last result (pulled at render)."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["StreamStats"]


class StreamStats:
    """Counts for stream sessions by model; registers itself as gauge sources of a Metrics registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}
        self._drops: dict[str, int] = {}
        self._lag: dict[str, float] = {}

    def attach(self, metrics: Any) -> None:
        """Publish ``streams_open``, ``stream_dropped_items`` and ``stream_lag_seconds`` per model."""
        metrics.add_gauge_source("streams_open", "Stream sessions open.", self.open_streams)
        metrics.add_gauge_source(
            "stream_dropped_items", "Stream items dropped by policy or deadline since start.", self.drops
        )
        metrics.add_gauge_source(
            "stream_lag_seconds", "Time from an item's arrival to its result (latest result).", self.lags
        )

    def opened(self, model: str) -> None:
        """A stream of ``model`` opened."""
        with self._lock:
            self._open[model] = self._open.get(model, 0) + 1

    def closed(self, model: str) -> None:
        """A stream of ``model`` ended."""
        with self._lock:
            self._open[model] = max(0, self._open.get(model, 0) - 1)

    def dropped(self, model: str, n: int) -> None:
        """``n`` items of a stream of ``model`` were dropped."""
        with self._lock:
            self._drops[model] = self._drops.get(model, 0) + n

    def lag(self, model: str, seconds: float) -> None:
        """A result of ``model`` went out ``seconds`` after its item arrived."""
        with self._lock:
            self._lag[model] = seconds

    def open_streams(self) -> dict[str, float]:
        """Open streams by model."""
        with self._lock:
            return {m: float(n) for m, n in self._open.items()}

    def drops(self) -> dict[str, float]:
        """Dropped items by model since start."""
        with self._lock:
            return {m: float(n) for m, n in self._drops.items()}

    def lags(self) -> dict[str, float]:
        """Lag of the latest result by model (seconds)."""
        with self._lock:
            return dict(self._lag)
