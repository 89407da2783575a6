"""Live drift in the daemon: one monitor per served model version, scores out, events and evidence.

:meth:`DriftWatch.observe` is called by the serving adapter after each answered request. For a
model without a reference profile it costs one dict lookup; with one, it stages the tensors in the
version's :class:`~edgert.drift.monitor.DriftMonitor` (see there for the amortized fold). The
monitor of a version is built the first time that version answers (a swap gives a fresh window).

When a score crosses its threshold the watch writes a ``drift`` audit record, emits a ``drift``
event (MQTT ``events`` through :attr:`DriftWatch.events`) and, with ``capture_samples`` set, seals
the next N requests of that model to the fleet capture key (``<state>/capture/<model>/``, opened
with ``edgert capture open``): evidence, never raw data in telemetry.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgert.drift.monitor import DriftAlarm, DriftMonitor
from edgert.drift.profile import ReferenceProfile
from edgert.errors import EdgertError

__all__ = ["DRIFT_CAPTURE_MAX_BYTES", "DriftWatch"]

log = logging.getLogger("edgert.device.drift")

#: Size cap of a model's capture directory for drift evidence when the model has no capture config.
DRIFT_CAPTURE_MAX_BYTES = 16 << 20
#: Prometheus gauges (``edgert_drift_*``, label ``model``), also copied into each telemetry model entry.
GAUGES = {
    "drift_psi": ("psi", "Worst mean PSI of the model's inputs (and value outputs) over the drift window."),
    "drift_js": ("js", "Worst Jensen-Shannon divergence (base 2) of the predicted class mix over the "
                       "window."),
    "drift_confidence": ("confidence", "Mean top-class confidence over the drift window."),
    "drift_samples": ("samples", "Rows in the drift window."),
    "drift_alarm": ("alarm", "1 while a drift alarm is raised (until the scores recover)."),
}


class _Evidence:
    """The remaining drift-capture budget of one model and the sink that seals it."""

    def __init__(self, sink: Any, samples: int, event_id: str, version: str) -> None:
        self.sink, self.left, self.event_id, self.version = sink, samples, event_id, version


class DriftWatch:
    """Per-model drift monitors of the daemon (created empty; models join as they answer)."""

    def __init__(self, *, entry: Callable[[str], Any], reference: Callable[[Any, str], Any],
                 audit: Callable[..., None], capture_root: Callable[[], Path]) -> None:
        self._entry, self._reference, self._audit = entry, reference, audit
        self._capture_root = capture_root
        self.monitors: dict[str, DriftMonitor] = {}
        self._known: dict[str, str] = {}  # model -> version already looked at (with no monitor)
        self._evidence: dict[str, _Evidence] = {}
        self.events: list[Callable[[dict[str, Any]], None]] = []

    @classmethod
    def for_daemon(cls, daemon: Any, state_root: Callable[[], Path]) -> DriftWatch:
        """The daemon's watch: its config entries, model source, audit, metrics and state dir (no I/O)."""

        def reference(entry: Any, version: str) -> Any:
            return daemon.source.reference(entry, version) if daemon.source is not None else None

        watch = cls(entry=daemon.entry, reference=reference,
                    audit=lambda *a, **k: daemon.audit.event(*a, **k), capture_root=state_root)
        for gauge, (key, help_text) in GAUGES.items():
            daemon.metrics.add_gauge_source(gauge, help_text, watch.gauge(key))
        return watch

    # -- request path ---------------------------------------------------------------------------------
    def observe(self, name: str, version: str, inputs: Mapping[str, np.ndarray],
                outputs: Mapping[str, np.ndarray], request_id: str = "") -> None:
        """One answered request of ``name`` at ``version``; never raises into serving."""
        monitor = self.monitors.get(name)
        if monitor is None or monitor.version != version:
            if self._known.get(name) == version:
                return
            monitor = self._start(name, version)
            if monitor is None:
                return
        if self._evidence:  # only after a drift event, until N requests are sealed
            evidence = self._evidence.get(name)
            if evidence is not None:
                self._seal(name, evidence, inputs, outputs, request_id)
        try:
            alarm = monitor.observe(inputs, outputs)
        except Exception:  # a sketch must never fail a request
            log.exception("drift sketch update failed; drift is off for this version",
                          extra={"model": name, "version": version})
            self.monitors.pop(name, None)
            self._known[name] = version
            return
        if alarm is not None:
            self._alarm(alarm)

    def _start(self, name: str, version: str) -> DriftMonitor | None:
        self._known[name] = version
        self.monitors.pop(name, None)
        entry = self._entry(name)
        if entry is None or not entry.drift.enabled:
            return None
        try:
            doc = self._reference(entry, version)
            if doc is None:
                log.info("no reference profile: drift off", extra={"model": name, "version": version})
                return None
            monitor = DriftMonitor(name, version, ReferenceProfile.from_dict(doc), entry.drift)
        except EdgertError as exc:
            log.warning("cannot use the reference profile: drift off",
                        extra={"model": name, "version": version, "error": exc.message})
            return None
        self.monitors[name] = monitor
        log.info("drift on", extra={"model": name, "version": version, "samples": monitor.profile.samples})
        return monitor

    # -- alarms and evidence --------------------------------------------------------------------------
    def _alarm(self, alarm: DriftAlarm) -> None:
        entry = self._entry(alarm.model)
        settings = entry.drift if entry is not None else None
        event_id = uuid.uuid4().hex[:16]
        capture = self._open_evidence(alarm, event_id, settings) if settings is not None else None
        doc = {"event": "drift", "model": alarm.model, "version": alarm.version, "id": event_id,
               "crossed": list(alarm.crossed), "scores": _finite(alarm.scores),
               "capture": capture}
        log.warning("drift", extra={"model": alarm.model, "version": alarm.version,
                                    "crossed": list(alarm.crossed)})
        try:
            self._audit("drift", model=alarm.model, version=alarm.version, id=event_id,
                        crossed=list(alarm.crossed), capture=capture)
        except Exception:
            log.exception("cannot audit the drift event")
        for sink in self.events:
            try:
                sink(doc)
            except Exception:  # an event sink must never fail a request
                log.exception("drift event sink failed")

    def _open_evidence(self, alarm: DriftAlarm, event_id: str, settings: Any) -> dict[str, Any] | None:
        if settings.capture_samples <= 0 or alarm.model in self._evidence:
            return None
        from edgert import paths
        from edgert.device.compliance import CaptureSink
        from edgert.security.capture import CaptureWriter, load_capture_config
        from edgert.security.keys import fingerprint, parse_public_key

        try:
            cdir = paths.capture_dir(self._capture_root())
            configured = load_capture_config(cdir).get(alarm.model)
            key_text = settings.capture_fleet_key or (configured.fleet_public_key if configured else "")
            if not key_text:
                log.warning("drift capture needs a fleet capture key: set [models.drift] capture_fleet_key "
                            "or 'edgert capture enable'", extra={"model": alarm.model})
                return None
            key = parse_public_key(key_text)
            cap = configured.max_bytes if configured else DRIFT_CAPTURE_MAX_BYTES
            writer = CaptureWriter(cdir, alarm.model, key, rate=1.0, max_bytes=cap)
        except (EdgertError, OSError) as exc:
            log.warning("cannot start the drift capture", extra={"model": alarm.model, "error": str(exc)})
            return None
        self._evidence[alarm.model] = _Evidence(CaptureSink({alarm.model: writer}), settings.capture_samples,
                                                event_id, alarm.version)
        return {"samples": settings.capture_samples, "directory": f"capture/{alarm.model}",
                "fleet_key": fingerprint(key)}

    def _seal(self, name: str, evidence: _Evidence, inputs: Mapping[str, np.ndarray],
              outputs: Mapping[str, np.ndarray], request_id: str) -> None:
        if evidence.sink.offer(name, inputs, outputs, reason="drift", drift_event=evidence.event_id,
                               version=evidence.version, request_id=request_id):
            evidence.left -= 1
        if evidence.left <= 0:
            self._evidence.pop(name, None)
            # Off the request path: closing waits for the sealing worker to write what is queued.
            threading.Thread(target=self._finish, args=(name, evidence), name="edgert-drift-capture",
                             daemon=True).start()

    def _finish(self, name: str, evidence: _Evidence) -> None:
        evidence.sink.close()
        doc = {"event": "drift_capture", "model": name, "version": evidence.version, "id": evidence.event_id,
               "captured": evidence.sink.stats()[name]["captured"], "directory": f"capture/{name}"}
        for sink in self.events:
            try:
                sink(doc)
            except Exception:
                log.exception("drift event sink failed")

    # -- views -------------------------------------------------------------------------------------
    def gauge(self, key: str) -> Callable[[], dict[str, float]]:
        """A metrics gauge source: the headline score ``key`` per model (finite values only)."""
        def read() -> dict[str, float]:
            out = {}
            for name, monitor in list(self.monitors.items()):
                value = monitor.headline()[key]
                if math.isfinite(value):
                    out[name] = value
            return out
        return read

    def status(self, name: str) -> dict[str, Any] | None:
        """The drift scores of ``name`` for the daemon status (None without a monitor)."""
        monitor = self.monitors.get(name)
        if monitor is None:
            return None
        s = monitor.scores()
        return _finite({"samples": s["samples"], "alarm": s["alarm"], "alarms": s["alarms"],
                        "inputs": s["inputs"], "outputs": s["outputs"]})

    def reset(self) -> None:
        """Forget every monitor (after a config reload): each model starts a fresh window."""
        self.monitors, self._known = {}, {}

    def close(self) -> None:
        """Finish pending drift captures."""
        for evidence in list(self._evidence.values()):
            evidence.sink.close()
        self._evidence.clear()


def _finite(doc: Any) -> Any:
    """Rounded scores with NaN as None (JSON has no NaN)."""
    if isinstance(doc, dict):
        return {k: _finite(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_finite(v) for v in doc]
    if isinstance(doc, float):
        return round(doc, 6) if math.isfinite(doc) else None
    return doc
