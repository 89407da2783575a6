"""One request's timing record, filled where each stage happens, and the slow-request log line.

A transport (HTTP, socket) starts a :class:`RequestTiming` when a request arrives and hands it to the
engine, which stamps admission, validation, queue, run and output; the transport then adds its
encode time and calls :meth:`Tracer.finish`, which logs one JSON line when the request was slower
than the configured threshold. In-process callers get a record made by the engine.

All times are ``time.monotonic_ns()`` values or durations in ns (never wall clock). Stages:

========== ======================================================================================
admission  arrival at the transport to admission into the engine, minus decoding: time waiting
           behind other requests on the connection or the event loop, and the admission check
input      decoding the tensors (transport) + validating them (engine) + joining a batch
queue      waiting in the model's batch queue or for a pool thread (0 when run inline)
load       decrypt + load of a cold model this request waited for (``None``: the model was
           loaded). Filled by the lazy-load path, which gets the record as the ``timing``
           argument of ``ServingPort.infer``: ``timing.load_ns = time.monotonic_ns() - waited_from``
           before it calls ``Engine.infer``; nothing else writes it. It is left out of admission
infer      the session run (for a batched request: its batch's run)
output     splitting a batch and selecting outputs (engine)
encode     encoding the response (transport)
========== ======================================================================================
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from edgert.metrics.tracecontext import TRACEPARENT_VERSION, new_ids, new_span_id, parse_traceparent

__all__ = ["CPU_SAMPLE_EVERY", "DEFAULT_SLOW_REQUEST_MS", "RequestTiming", "Tracer"]

log = logging.getLogger("edgert.trace")

#: Thread CPU time costs ~0.8 us per read (a system call), 40x a monotonic read, so CPU time per
#: stage is measured on one request in this many; the metrics divide by the sampled count.
CPU_SAMPLE_EVERY = 16
#: Default ``[daemon] slow_request_ms``.
DEFAULT_SLOW_REQUEST_MS = 100.0
#: The ``msg`` of a slow-request log line (what ``edgert trace tail`` looks for).
SLOW_REQUEST_MSG = "slow request"
#: At most this many slow-request lines per second (a device whose model is always over the threshold
#: would otherwise write one line per request to journald); the next line says how many were left out.
#: ``slow_request_ms = 0`` (log every request, for debugging) is not limited.
SLOW_LOG_MAX_PER_S = 20

_sample_counter = itertools.count()
_now = time.monotonic_ns


class RequestTiming:
    """Where one request spent its time (see the module docstring for the stages).

    Class attributes are the defaults, so making one costs a dict and two stores on the fast path.
    """

    trace_id = ""  # 32 hex digits; "" for in-process requests
    parent_id = ""  # the caller's span, from its traceparent ("" when we started the trace)
    flags = "00"
    span_id = ""  # ours
    transport = "inproc"
    model = ""
    version = ""
    decode_ns = 0
    admitted_ns = 0
    validated_ns = 0
    queue_ns = 0
    input_ns = 0  # engine side: validation and batch join
    infer_ns = 0
    output_ns = 0
    encode_ns = 0
    finished_ns = 0  # the engine is done with it
    done_ns = 0  # the transport has encoded the answer
    rows = 0  # rows of this request
    batch_size = 0  # rows of the session run that served it
    batched = False
    cached = False
    #: Decrypt + load of a cold model, filled by the lazy-load path (None: the model was warm).
    load_ns: int | None = None
    #: True when this request's CPU time per stage is measured (one in CPU_SAMPLE_EVERY).
    cpu = False
    cpu_input_ns = 0
    cpu_infer_ns = 0
    cpu_output_ns = 0

    def __init__(self, received_ns: int | None = None) -> None:
        self.received_ns = _now() if received_ns is None else received_ns
        if next(_sample_counter) % CPU_SAMPLE_EVERY == 0:
            self.cpu = True

    @property
    def admission_ns(self) -> int:
        """Arrival to admission, minus decoding and any cold load waited for before admission."""
        if not self.admitted_ns:
            return 0
        return max(0, self.admitted_ns - self.received_ns - self.decode_ns - (self.load_ns or 0))

    @property
    def total_ns(self) -> int:
        """Arrival to the end of encoding (or of the engine, before the transport encodes)."""
        end = self.done_ns or self.finished_ns or _now()
        return max(0, end - self.received_ns)

    def stages_ms(self) -> dict[str, Any]:
        """The per-stage durations in ms (and the batch size), for the slow-request log line."""
        return {
            "total_ms": _ms(self.total_ns),
            "admission_ms": _ms(self.admission_ns),
            "input_ms": _ms(self.decode_ns + self.input_ns),
            "queue_ms": _ms(self.queue_ns),
            "batch_size": self.batch_size,
            "load_ms": None if self.load_ns is None else _ms(self.load_ns),
            "infer_ms": _ms(self.infer_ns),
            "output_ms": _ms(self.output_ns),
            "encode_ms": _ms(self.encode_ns),
            "cached": self.cached,
        }


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


class Tracer:
    """Starts request timings with their trace context and logs the slow ones as one JSON line each."""

    def __init__(
        self,
        slow_request_ms: float | None = DEFAULT_SLOW_REQUEST_MS,
        *,
        max_per_s: int = SLOW_LOG_MAX_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: Threshold in ns; None disables the slow-request log.
        self.slow_ns = None if slow_request_ms is None or slow_request_ms < 0 else int(slow_request_ms * 1e6)
        self._max_per_s, self._clock = max_per_s, clock
        self._second, self._logged, self._suppressed = -1, 0, 0
        self._rate_lock = threading.Lock()

    def start(self, transport: str, traceparent: str | None, received_ns: int | None = None) -> RequestTiming:
        """A timing for a request that arrived at ``received_ns`` with an optional ``traceparent``.

        A missing or malformed header starts a new trace; the caller returns
        :meth:`reply_traceparent` either way.
        """
        timing = RequestTiming(received_ns)
        timing.transport = transport
        given = parse_traceparent(traceparent) if traceparent else None
        if given is None:
            timing.trace_id, timing.span_id = new_ids()
        else:
            timing.trace_id, timing.parent_id, timing.flags = given.trace_id, given.parent_id, given.flags
            timing.span_id = new_span_id()
        return timing

    @staticmethod
    def reply_traceparent(timing: RequestTiming) -> str:
        """The ``traceparent`` to return: the same trace id, our span as the parent."""
        return f"{TRACEPARENT_VERSION}-{timing.trace_id}-{timing.span_id}-{timing.flags}"

    def finish(self, timing: RequestTiming, status: int) -> None:
        """The transport has answered (``status``): log the request if it was slow."""
        if self.slow_ns is None:
            return
        timing.done_ns = _now()
        total = timing.total_ns
        if total < self.slow_ns:
            return
        fields = {
            "trace_id": timing.trace_id,
            "span_id": timing.span_id,
            "transport": timing.transport,
            "model": timing.model,
            "version": timing.version,
            "status": status,
            "threshold_ms": self.slow_ns / 1e6,
        }
        fields.update(timing.stages_ms())
        if self.slow_ns > 0:
            suppressed = self._admit_line()
            if suppressed is None:
                return
            if suppressed:
                fields["suppressed"] = suppressed
        log.warning(SLOW_REQUEST_MSG, extra=fields)

    def _admit_line(self) -> int | None:
        """None when this second's lines are used up; else how many were left out before this one."""
        second = int(self._clock())
        with self._rate_lock:
            if second != self._second:
                self._second, self._logged = second, 0
            if self._logged >= self._max_per_s:
                self._suppressed += 1
                return None
            self._logged += 1
            suppressed, self._suppressed = self._suppressed, 0
            return suppressed
