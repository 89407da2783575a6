"""Stream sessions: items pushed with ids and timestamps, results in order, real-time drop policies.

A stream is bound to one served name (a model, cascade or pipeline) and runs every item through the
same ``infer`` the request path uses (the daemon passes its ServingPort, hence ``Engine.infer``), so
streams take part in admission control and dynamic batching. Each stream has at most one item in
the engine at a time, so a fast sender cannot take more than its share from other streams or from
request traffic; when the engine refuses an item (overloaded), the stream waits ``retry_after`` and
tries again, applying its policy to what arrived meanwhile.

Policies (per stream):

- ``all``: nothing is dropped; the queue holds ``queue`` items and the transport stops reading from
  the sender while it is full (back-pressure);
- ``latest``: only the newest pending item is kept (video): an item waiting when a newer one
  arrives is dropped;
- ``drop-oldest``: a bounded queue of ``queue`` items that drops its oldest on overflow;
- ``deadline_ms`` (with any policy): an item not started within that time of its arrival is dropped.

Each result says how many items were dropped between the previous result's item and its own, and
its lag (time from the item's arrival to its result). The session ends when the client closes it
(queued items are still answered), when the transport goes away, or after ``idle_timeout_s``
without a push.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from edgert.engine.stream_plan import (
    DEFAULT_QUEUE,
    IDLE_TIMEOUT_S,
    MAX_QUEUE,
    POLICIES,
    StreamOptions,
    StreamPlan,
)
from edgert.engine.windows import WindowAssembler, check_chunk
from edgert.errors import EdgertError, InputError, ModelError, OverloadedError, ServeError, UnknownModelError

__all__ = [
    "DEFAULT_QUEUE",
    "IDLE_TIMEOUT_S",
    "MAX_QUEUE",
    "POLICIES",
    "PendingQueue",
    "StreamEnd",
    "StreamItem",
    "StreamOptions",
    "StreamPlan",
    "StreamResult",
    "StreamSession",
]

#: Longest wait after the engine refuses an item as overloaded before trying again.
MAX_RETRY_WAIT_S = 1.0


class StreamObserver(Protocol):
    """Where a session reports for metrics (edgert.metrics.streams.StreamStats fits)."""

    def opened(self, model: str) -> None:
        """A stream of ``model`` opened."""

    def closed(self, model: str) -> None:
        """A stream of ``model`` ended."""

    def dropped(self, model: str, n: int) -> None:
        """``n`` items of a stream of ``model`` were dropped."""

    def lag(self, model: str, seconds: float) -> None:
        """A result of ``model`` was sent ``seconds`` after its item arrived."""


@dataclass
class StreamItem:
    """One item waiting to run: the client's id and timestamp, arrival time, model inputs."""

    id: Any
    ts: Any
    received: float
    inputs: dict[str, np.ndarray]
    dropped: int = 0  # items dropped between the previous item taken and this one


@dataclass
class StreamResult:
    """One answer, in push order: outputs or an error, with drop and lag accounting."""

    id: Any
    ts: Any
    seq: int
    dropped: int
    lag_s: float
    run_s: float
    queued: int
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    status: int = 0

    def meta(self) -> dict[str, Any]:
        """The JSON fields of a result message (everything but the tensors)."""
        doc: dict[str, Any] = {
            "id": self.id,
            "seq": self.seq,
            "dropped": self.dropped,
            "lag_ms": round(self.lag_s * 1000.0, 3),
            "run_ms": round(self.run_s * 1000.0, 3),
            "queued": self.queued,
        }
        if self.ts is not None:
            doc["ts"] = self.ts
        if self.error is not None:
            doc["error"], doc["status"] = self.error, self.status
        return doc


@dataclass(frozen=True)
class StreamEnd:
    """Why and how a stream ended."""

    reason: str  # "closed" (by the client), "idle", "gone" (transport lost), "shutdown"
    results: int
    dropped: int

    def meta(self) -> dict[str, Any]:
        """The JSON fields of an end message."""
        return {"reason": self.reason, "results": self.results, "dropped": self.dropped}


class PendingQueue:
    """Items waiting for the engine, under one policy (pure; ``now`` is passed in)."""

    def __init__(self, policy: str, capacity: int, deadline_s: float | None) -> None:
        self.policy = policy
        self.capacity = 1 if policy == "latest" else capacity
        self.deadline_s = deadline_s
        self.items: deque[StreamItem] = deque()
        self.dropped = 0  # dropped since the last item taken: charged to the next one taken
        self.dropped_total = 0

    def __len__(self) -> int:
        return len(self.items)

    def full(self) -> bool:
        """True while the sender should be held (``all`` only: other policies drop instead)."""
        return self.policy == "all" and len(self.items) >= self.capacity

    def offer(self, item: StreamItem) -> int:
        """Queue ``item``; returns how many items the policy dropped to make room."""
        self.items.append(item)
        if self.policy == "all":
            return 0  # the transport stops reading once full(): nothing is dropped
        excess = len(self.items) - self.capacity
        for _ in range(max(0, excess)):
            self.items.popleft()
        return self._count(max(0, excess))

    def take(self, now: float) -> tuple[StreamItem | None, int]:
        """The next item to run (or None) and how many expired items were dropped on the way."""
        expired = 0
        while self.items:
            item = self.items.popleft()
            if self.deadline_s is not None and now - item.received > self.deadline_s:
                expired += 1
                continue
            self._count(expired)
            item.dropped, self.dropped = self.dropped, 0
            return item, expired
        return None, self._count(expired)

    def requeue(self, item: StreamItem) -> int:
        """Put back an item the engine refused; ``latest`` drops it if a newer one is waiting."""
        self.dropped += item.dropped  # its share goes back to whichever item is taken next
        item.dropped = 0
        if self.policy == "latest" and self.items:
            return self._count(1)
        self.items.appendleft(item)
        return 0

    def _count(self, n: int) -> int:
        self.dropped += n
        self.dropped_total += n
        return n


InferFn = Callable[..., Awaitable[Any]]


class _NullObserver:
    def opened(self, model: str) -> None:
        pass

    def closed(self, model: str) -> None:
        pass

    def dropped(self, model: str, n: int) -> None:
        pass

    def lag(self, model: str, seconds: float) -> None:
        pass


class StreamSession:
    """One stream: ``push`` from the transport, ``run`` as a task that emits results in order.

    The transport supplies ``emit(result)`` (write one result), ``writable()`` (wait until the
    client reads, so results are not piled up in memory) and ``on_space()`` (the ``all`` queue has
    room again: resume reading). ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        plan: StreamPlan,
        infer: InferFn,
        emit: Callable[[StreamResult], None],
        *,
        writable: Callable[[], Awaitable[None]] | None = None,
        on_space: Callable[[], None] | None = None,
        observer: StreamObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan = plan
        self.options = plan.options
        self.model = plan.options.model
        self._infer = infer
        self._emit = emit
        self._writable = writable
        self._on_space = on_space
        self._observer: StreamObserver = observer or _NullObserver()
        self._clock = clock
        self.queue = PendingQueue(self.options.policy, self.options.queue, self.options.deadline_s)
        self.windows = WindowAssembler(plan.window) if plan.window is not None else None
        self.closing = False  # the client closed: answer what is queued, then end
        self.results = 0
        self.last_push = clock()
        self._reported = 0  # drops already reported to the observer
        self._wake = asyncio.Event()
        self._observer.opened(self.model)

    # -- transport side ------------------------------------------------------------------------------
    def full(self) -> bool:
        """True while the transport should stop reading from the sender."""
        return self.queue.full()

    def push(self, item_id: Any, ts: Any, arrays: Mapping[str, np.ndarray]) -> None:
        """Take one pushed item (or chunk); raises InputError for a bad one (the stream carries on)."""
        if self.closing:
            raise InputError(
                f"push of item {item_id!r} after the stream was closed",
                hint="open a new stream to send more items",
            )
        now = self._clock()
        self.last_push = now
        chunk = self._one_array(arrays)
        plan = self.plan
        if self.windows is not None:
            check_chunk(plan.input, chunk, plan.dtype, plan.item_shape)
            pieces = self.windows.push(chunk)
        else:
            pieces = [chunk]
        for piece in pieces:
            data = piece[np.newaxis] if plan.batched and piece.ndim == len(plan.item_shape) else piece
            self.queue.offer(StreamItem(item_id, ts, now, {plan.input: data}))
        self._count_drops()
        if pieces:
            self._wake.set()

    def _one_array(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        if len(arrays) != 1:
            raise InputError(
                f"a stream push carries one tensor (for input {self.plan.input!r}), got {len(arrays)}"
            )
        ((name, array),) = arrays.items()
        if name not in (self.plan.input, ""):
            raise InputError(f"this stream feeds input {self.plan.input!r}; the push names {name!r}")
        return array

    def close(self) -> None:
        """The client is done: answer the queued items, then end (reason "closed")."""
        self.closing = True
        self._wake.set()

    # -- the worker ----------------------------------------------------------------------------------
    async def run(self) -> StreamEnd:
        """Run items until closed, idle or cancelled; returns how the stream ended."""
        reason = "gone"
        try:
            while True:
                item = await self._next_item()
                if item is None:
                    reason = "closed" if self.closing else "idle"
                    break
                if self._writable is not None:
                    await self._writable()
                    item = self._fresher(item)
                result = await self._run(item)
                if result is not None:
                    self._emit(result)
        except asyncio.CancelledError:
            reason = "gone"
            raise
        finally:
            self._observer.closed(self.model)
        return StreamEnd(reason, self.results, self.queue.dropped_total)

    def _fresher(self, item: StreamItem) -> StreamItem:
        """Under ``latest``, a newer item that arrived while the client was not reading wins."""
        if self.options.policy == "latest" and len(self.queue):
            self.queue.requeue(item)
            return self._take() or item
        return item

    async def _next_item(self) -> StreamItem | None:
        while True:
            item = self._take()
            if item is not None:
                return item
            if self.closing:
                return None
            self._wake.clear()
            left = self.last_push + self.options.idle_timeout_s - self._clock()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                continue

    def _take(self) -> StreamItem | None:
        """Next item under the policy; reports drops and tells the transport when room appears."""
        was_full = self.queue.full()
        item, _ = self.queue.take(self._clock())
        self._count_drops()
        if was_full and not self.queue.full() and self._on_space is not None:
            self._on_space()
        return item

    def _count_drops(self) -> None:
        pending = self.queue.dropped_total - self._reported
        if pending:
            self._observer.dropped(self.model, pending)
            self._reported = self.queue.dropped_total

    async def _run(self, item: StreamItem) -> StreamResult | None:
        started = self._clock()
        opts = self.options
        while True:
            try:
                outcome = await self._infer(
                    opts.model, item.inputs, version=opts.version, outputs=opts.outputs
                )
            except OverloadedError as exc:
                await asyncio.sleep(min(MAX_RETRY_WAIT_S, exc.retry_after))
                self.queue.requeue(item)  # under latest, a newer item replaces it
                next_item = self._take()
                if next_item is None:
                    return None
                item, started = next_item, self._clock()
                continue
            except EdgertError as exc:
                return self._result(item, started, {}, exc)
            return self._result(item, started, dict(outcome.outputs), None)

    def _result(
        self, item: StreamItem, started: float, outputs: dict[str, np.ndarray], exc: EdgertError | None
    ) -> StreamResult:
        now = self._clock()
        self.results += 1
        lag = now - item.received
        self._observer.lag(self.model, lag)
        result = StreamResult(
            item.id, item.ts, self.results, item.dropped, lag, now - started, len(self.queue), outputs
        )
        if exc is not None:
            result.error = str(exc)
            result.status = _status(exc)
        return result


def _status(exc: EdgertError) -> int:
    """HTTP-style status of a failed item (the transports' status_for, for the errors a run raises)."""
    if isinstance(exc, UnknownModelError):
        return 404
    if isinstance(exc, (InputError, ModelError)):
        return 400
    return 503 if isinstance(exc, ServeError) else 500
