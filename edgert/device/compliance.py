"""The daemon's audit trail and sealed capture.

:class:`DaemonAudit` appends the daemon's security-relevant events (start/stop, model load, swap,
failed swap, unload, config reload) to the device audit log; it is off when the device has no
keys yet (nothing encrypted can be served then either). Audit failures are logged and never stop
serving.

:class:`CaptureSink` keeps sealed capture off the request path: the request only pays for a dict
lookup and, when capture is enabled for the model, one random draw. Sampled requests go to a
bounded queue; one worker thread seals and writes them under each model's size cap. When the queue
is full the record is dropped and counted (capture is a sample, never back-pressure).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgert import paths
from edgert.security.audit import REFUSAL_INTERVAL_S, RefusalAggregator

__all__ = ["CAPTURE_QUEUE", "CaptureSink", "DaemonAudit", "open_capture_sink", "open_daemon_audit"]

log = logging.getLogger("edgert.device.compliance")

#: Sampled requests waiting to be sealed; beyond this they are dropped and counted.
CAPTURE_QUEUE = 256
#: How long shutdown waits for the capture worker to write what is queued (s).
CAPTURE_DRAIN_S = 10.0


class DaemonAudit:
    """Appends daemon events to the device audit log (a no-op without one).

    Refusals of untrusted input (``mqtt.command.refused`` and other ``*.refused``/``*.rejected``
    events) go through a :class:`~edgert.security.audit.RefusalAggregator`: a few records per reason
    and interval instead of one per message. Every other event is recorded one by one.
    """

    def __init__(self, audit: Any | None, *, refusal_interval_s: float = REFUSAL_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._audit = audit
        self._front: RefusalAggregator | None = None
        if audit is not None:
            self._front = RefusalAggregator(audit, interval_s=refusal_interval_s, clock=clock)
            self._front.start()

    @property
    def enabled(self) -> bool:
        """True when events are recorded."""
        return self._front is not None

    def event(self, name: str, **fields: Any) -> None:
        """Record one event; failures are logged, never raised into serving."""
        if self._front is None:
            return
        try:
            self._front.event(name, **fields)
        except Exception:
            log.exception("cannot write the audit log", extra={"event": name})

    def head(self) -> dict[str, Any] | None:
        """The latest signed head of the log ``{v, seq, hash, ts, sig}``, for status and telemetry."""
        return self._front.log.head() if self._front is not None else None

    def status(self) -> dict[str, Any]:
        """``{"enabled", "head", "refusals_aggregated", "refusals_pending"}`` for the daemon status."""
        if self._front is None:
            return {"enabled": False, "head": None}
        return {"enabled": True, "head": self.head(), "refusals_aggregated": self._front.aggregated,
                "refusals_pending": self._front.pending()}

    def close(self) -> None:
        """Write pending refusal summaries, sign a checkpoint and close the log."""
        if self._front is not None:
            try:
                self._front.close()
            except Exception:
                log.exception("cannot close the audit log")
            self._front = None
            self._audit = None


def open_daemon_audit(root: Path) -> DaemonAudit:
    """The audit log under ``root``, signing checkpoints with the device key; off without keys."""
    from edgert.security.loader import open_audit, open_keystore

    if not paths.keys_dir(root).is_dir():
        log.info("no device keys under %s: audit log off", root)
        return DaemonAudit(None)
    return DaemonAudit(open_audit(root, open_keystore(root)))


_Item = tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]


class CaptureSink:
    """Sealed capture for the models that have it enabled; sampling inline, sealing on a worker."""

    def __init__(self, writers: Mapping[str, Any], queue_size: int = CAPTURE_QUEUE) -> None:
        self.writers = dict(writers)
        self.dropped_queue_full = 0
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="edgert-capture", daemon=True)
        self._thread.start()

    def offer(self, model: str, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
              **meta: Any) -> bool:
        """Called per request: sample, and queue a copy of a sampled request for sealing."""
        writer = self.writers.get(model)
        if writer is None or not writer.sample():
            return False
        # Copy the inputs: a front end may reuse its receive buffer once the request is answered.
        record = ({k: np.array(v, copy=True) for k, v in inputs.items()}, dict(outputs), meta)
        try:
            self._queue.put_nowait((writer, *record))
        except queue.Full:
            self.dropped_queue_full += 1
            return False
        return True

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            writer, inputs, outputs, meta = item
            try:
                writer.write(inputs, outputs, **meta)
            except Exception:
                log.exception("capture write failed", extra={"model": writer.model})

    def close(self, timeout: float = CAPTURE_DRAIN_S) -> None:
        """Write what is queued (up to ``timeout``), stop the worker and close the files."""
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("capture worker did not finish; queued records are lost")
            return
        for writer in self.writers.values():
            writer.close()

    def stats(self) -> dict[str, dict[str, int]]:
        """Per-model counts: captured, dropped at the size cap (and queue drops under ``_queue``)."""
        out = {m: {"captured": w.captured, "dropped_full": w.dropped_full} for m, w in self.writers.items()}
        out["_queue"] = {"dropped_full": self.dropped_queue_full}
        return out


def open_capture_sink(root: Path, served: set[str]) -> CaptureSink | None:
    """A sink for the served models with capture enabled in ``<root>/capture/config.json`` (or None)."""
    from edgert.security.capture import CaptureWriter, load_capture_config

    cdir = paths.capture_dir(root)
    settings = {m: s for m, s in load_capture_config(cdir).items() if s.rate > 0}
    unknown = sorted(settings.keys() - served)
    if unknown:
        log.warning("capture is enabled for models this daemon does not serve", extra={"models": unknown})
    writers = {m: CaptureWriter.from_settings(cdir, m, s) for m, s in settings.items() if m in served}
    if not writers:
        return None
    log.info("sealed capture on", extra={"models": sorted(writers)})
    return CaptureSink(writers)
