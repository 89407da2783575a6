"""Shadow evaluation: a candidate version runs beside the serving one on a sample of live requests.

The Deployer loads and health-checks the candidate through its usual load path and hands it to a
:class:`ShadowRunner`; it never swaps it in and never commits it. For a deterministic share of the
requests to that model (``percent``), :class:`~edgert.device.serving.ServingAdapter` offers the
request's inputs, the served outputs and the request's engine time to the runner *after* the caller
has its answer: the offer is a counter step and a non-blocking put on a bounded queue, and when the
queue is full the sample is skipped and counted. One worker thread runs the candidate and compares.
Shadow outputs are never returned to anyone; a failing candidate only counts errors.

:class:`ShadowStats` (pure, constant memory) keeps the comparison:

- ``agreement``: share of comparisons that agree. A float output of shape ``[rows, classes]``
  (``classes >= 2``) is classification-like: one comparison per row, agreeing when the top-1 class is
  the same (``top1`` alone is reported too). Any other float output is regression-like: one
  comparison per request, agreeing when ``np.allclose`` at :data:`REGRESSION_ATOL`/:data:`REGRESSION_RTOL`;
  its ``mean_abs_diff`` is reported. Other dtypes agree when equal. A missing output or another
  shape disagrees.
- ``latency_ratio``: median candidate run time (validate + run) over the median engine time of the
  same requests, over the last :data:`LATENCY_WINDOW` samples. The engine time includes any batching
  wait of the served model, so for batched models the ratio reads low.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "LATENCY_WINDOW", "QUEUE_SIZE", "REGRESSION_ATOL", "REGRESSION_RTOL", "ShadowRunner", "ShadowStats",
    "shadow_event",
]

log = logging.getLogger("edgert.device.shadow")

#: Requests waiting for the shadow worker; more are skipped (and counted), never waited for.
QUEUE_SIZE = 8
#: Latency samples kept (per side) for the medians.
LATENCY_WINDOW = 256
#: Tolerance under which two regression outputs agree.
REGRESSION_ATOL = 1e-3
REGRESSION_RTOL = 1e-2
#: How long closing a runner waits for the sample in progress (seconds).
CLOSE_TIMEOUT_S = 10.0
#: A failing candidate is logged on its first error and then every this many.
LOG_EVERY_ERRORS = 100


class ShadowStats:
    """Agreement and latency of a candidate against the served version, in constant memory (not locked)."""

    def __init__(self, window: int = LATENCY_WINDOW) -> None:
        self.samples = 0  # requests compared
        self.errors = 0  # candidate runs that failed
        self.agree = 0
        self.compared = 0
        self.top1_match = 0
        self.top1_rows = 0
        self.abs_sum = 0.0
        self.abs_count = 0
        self.active_s: deque[float] = deque(maxlen=window)
        self.shadow_s: deque[float] = deque(maxlen=window)

    def observe(self, active: Mapping[str, Any], shadow: Mapping[str, Any], active_s: float,
                shadow_s: float) -> None:
        """Compare one request's served outputs with the candidate's."""
        for name, value in active.items():
            self._compare(np.asarray(value), shadow.get(name))
        self.samples += 1
        self.active_s.append(active_s)
        self.shadow_s.append(shadow_s)

    def _compare(self, a: np.ndarray, other: Any) -> None:
        classes = a.dtype.kind == "f" and a.ndim == 2 and a.shape[1] >= 2
        rows = a.shape[0] if classes else 1
        if other is None or np.shape(other) != a.shape:
            self.compared += rows
            if classes:
                self.top1_rows += rows
            return
        s = np.asarray(other)
        if classes:
            match = int(np.count_nonzero(a.argmax(axis=1) == s.argmax(axis=1)))
            self.top1_match += match
            self.top1_rows += rows
            self.agree += match
        elif a.dtype.kind in "fc":
            diff = np.abs(a.astype(np.float64) - s.astype(np.float64))
            finite = np.isfinite(diff)
            self.abs_sum += float(diff[finite].sum())
            self.abs_count += int(finite.sum())
            self.agree += bool(finite.all() and np.allclose(s, a, atol=REGRESSION_ATOL, rtol=REGRESSION_RTOL))
        else:
            self.agree += bool(np.array_equal(a, s))
        self.compared += rows

    def error(self) -> None:
        """Count a candidate run that failed."""
        self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        """samples, errors, agreement, top1, mean_abs_diff and latency_ratio so far (None: no data)."""
        ratio = None
        if self.active_s and self.shadow_s:
            active = statistics.median(self.active_s)
            ratio = statistics.median(self.shadow_s) / active if active > 0 else None
        return {
            "samples": self.samples,
            "errors": self.errors,
            "agreement": self.agree / self.compared if self.compared else None,
            "top1": self.top1_match / self.top1_rows if self.top1_rows else None,
            "mean_abs_diff": self.abs_sum / self.abs_count if self.abs_count else None,
            "latency_ratio": ratio,
        }


class ShadowRunner:
    """Runs a candidate model on a sample of live requests, off their hot path; see the module docstring.

    :meth:`offer` is called on the daemon's event loop (one thread); the worker thread runs the model.
    """

    def __init__(self, model: Any, *, name: str, version: str, percent: float, rollout: str = "",
                 variant: str = "", queue_size: int = QUEUE_SIZE, window: int = LATENCY_WINDOW,
                 timer: Callable[[], float] = time.perf_counter) -> None:
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"shadow percent must be in [0, 100], got {percent}")
        self.model, self.name, self.version, self.rollout = model, name, version, rollout
        self.percent, self.variant, self.timer = float(percent), variant, timer
        self.offered = 0  # requests seen by offer
        self.sampled = 0  # of them, chosen for the shadow
        self.skipped = 0  # chosen, but the queue was full
        self._credit = 0.0
        self._stats = ShadowStats(window)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pending = 0  # queued or running samples
        self._queue: queue.Queue[tuple[Mapping[str, Any], Mapping[str, Any], float] | None] = \
            queue.Queue(queue_size)
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=f"edgert-shadow-{self.name}", daemon=True)
            self._thread.start()

    def offer(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], active_s: float) -> bool:
        """Hot path: maybe queue one answered request for the candidate (True if queued); never blocks."""
        self.offered += 1
        self._credit += self.percent  # deterministic: exactly percent of the offers, evenly spread
        if self._credit < 100.0 or self._closed:
            return False
        self._credit -= 100.0
        self.sampled += 1
        with self._lock:
            try:
                self._queue.put_nowait((inputs, outputs, active_s))
            except queue.Full:
                self.skipped += 1
                return False
            self._pending += 1
        return True

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._run_one(*item)
            finally:
                with self._done:
                    self._pending -= 1
                    self._done.notify_all()

    def _run_one(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], active_s: float) -> None:
        start = self.timer()
        try:
            got = self.model.run(self.model.validate(inputs))
        except Exception as exc:
            with self._lock:
                self._stats.error()
                errors = self._stats.errors
            if errors == 1 or errors % LOG_EVERY_ERRORS == 0:
                log.warning("shadow run failed (the caller was answered by the serving version)", extra={
                    "model": self.name, "version": self.version, "errors": errors,
                    "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            return
        shadow_s = self.timer() - start
        with self._lock:
            self._stats.observe(outputs, got, active_s, shadow_s)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every queued sample has been run (tests, final reports); False on timeout."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def snapshot(self) -> dict[str, Any]:
        """The comparison so far plus the sampling counters."""
        with self._lock:
            snap = self._stats.snapshot()
        snap.update(offered=self.offered, sampled=self.sampled, skipped=self.skipped)
        return snap

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stop sampling, drop queued samples, let the run in progress finish, close the model."""
        self._closed = True
        with self._done:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
                self._pending -= 1
            self._done.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
            if thread.is_alive():
                log.error("shadow worker did not stop; its model stays open", extra={"model": self.name})
                return
        self.model.close()


def shadow_event(runner: ShadowRunner, snap: Mapping[str, Any],
                 seq: int | None = None) -> dict[str, Any] | None:
    """The ``shadow`` event the fleet controller reads, or None while there is nothing to report."""
    if not snap.get("samples") or snap.get("agreement") is None or snap.get("latency_ratio") is None:
        return None
    event = {"event": "shadow", "rollout": runner.rollout, "model": runner.name, "version": runner.version,
             "agreement": round(float(snap["agreement"]), 6),
             "latency_ratio": round(float(snap["latency_ratio"]), 6), "samples": int(snap["samples"])}
    for key in ("top1", "mean_abs_diff"):
        if snap.get(key) is not None:
            event[key] = round(float(snap[key]), 6)
    event.update(errors=int(snap.get("errors", 0)), skipped=int(snap.get("skipped", 0)))
    if seq is not None:
        event["seq"] = seq
    return event


class ShadowPhase:
    """The updater's shadow step: start a candidate, report it every ``report_s``, stop it.

    Which models are in shadow (model -> the desired-state document) lives in ``shadows``, a dict inside
    the updater's persisted state (``save`` writes it), so a restarted daemon resumes the evaluation.
    Runs on the updater's worker thread; the Deployer calls go to the daemon's loop.
    """

    def __init__(self, *, deployer: Any, emit: Callable[[dict[str, Any]], None], shadows: dict[str, Any],
                 save: Callable[[], None], lock: threading.Lock, clock: Callable[[], float],
                 report_s: float) -> None:
        self.deployer, self.emit, self.shadows, self.save = deployer, emit, shadows, save
        self.lock, self.clock, self.report_s = lock, clock, report_s
        self._sent: dict[str, int] = {}  # model -> samples in the last report
        self._due: dict[str, float] = {}

    def start(self, doc: Mapping[str, Any], *, allow_downgrade: bool = False) -> None:
        """Load the document's version as a shadow of its model (the version is installed)."""
        model, version = str(doc["model"]), str(doc["version"])
        percent = float((doc.get("shadow") or {}).get("percent", 0.0))
        self.deployer.run_threadsafe(self.deployer.start_shadow(
            model, version, percent, origin="updater", rollout=str(doc.get("rollout", ""))[:64],
            allow_downgrade=allow_downgrade))
        with self.lock:
            self.shadows[model] = dict(doc)
            self.save()
        self._sent[model], self._due[model] = 0, self.clock() + self.report_s

    def end(self, model: str, version: str | None) -> bool:
        """Stop the shadow of ``model`` (final report first); True when it evaluated ``version``."""
        doc = self.shadows.get(model)
        if doc is None:
            return False
        self.report(force=True)
        try:
            self.deployer.run_threadsafe(self.deployer.stop_shadow(model, origin="updater"))
        finally:
            with self.lock:
                self.shadows.pop(model, None)
                self.save()
            self._sent.pop(model, None), self._due.pop(model, None)
        return version is not None and doc.get("version") == version

    def resume(self) -> list[tuple[dict[str, Any], str]]:
        """Start again the shadows persisted before a restart; (document, reason) of those that failed."""
        failed = []
        for model, doc in list(self.shadows.items()):
            if model in self.deployer.shadows:
                continue
            try:
                self.start(doc)
            except Exception as exc:
                reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.shadows.pop(model, None)
                    self.save()
                failed.append((dict(doc), str(reason)[:300]))
        return failed

    def report(self, *, force: bool = False) -> None:
        """Emit a ``shadow`` event for each model whose numbers changed and whose report is due."""
        now = self.clock()
        for model in list(self.shadows):
            runner = self.deployer.shadows.get(model)
            if runner is None or not (force or now >= self._due.get(model, 0.0)):
                continue
            self._due[model] = now + self.report_s
            snap = runner.snapshot()
            if snap["samples"] == self._sent.get(model):
                continue
            event = shadow_event(runner, snap, seq=self.shadows[model].get("seq"))
            if event is None:
                continue
            self._sent[model] = snap["samples"]
            try:
                self.emit(event)
            except Exception:  # an event sink must never stop the evaluation
                log.exception("shadow event sink failed")

    def wait_s(self, wait: float | None) -> float | None:
        """How long the updater's worker may sleep: ``wait``, shortened to the next report when shadowing."""
        if not self.shadows:
            return wait
        until = max(0.05, min(self._due.values(), default=self.clock()) - self.clock())
        return until if wait is None else min(wait, until)
