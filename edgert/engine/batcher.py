"""The dynamic batcher: a worker thread per model that joins queued requests into batches.

Requests come from the event loop (``submit_async``) and from other threads (``submit_sync``).
The worker applies :func:`edgert.engine.batching.plan_batch`, runs the joined batch outside the
event loop (onnxruntime releases the GIL while it runs), splits the outputs and completes the
requests. Async requests are completed with one ``call_soon_threadsafe`` per batch and loop, not one
per request, so waking the loop costs one self-pipe write per batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from edgert.engine.batching import WAIT, join_inputs, plan_batch, split_outputs
from edgert.errors import BackendError, EdgertError

if TYPE_CHECKING:
    from edgert.metrics.timing import RequestTiming

__all__ = ["STOP_JOIN_TIMEOUT_S", "Batcher"]

log = logging.getLogger("edgert.engine")

#: How long ``stop`` waits for the worker thread to finish its current batch.
STOP_JOIN_TIMEOUT_S = 10.0

Outputs = dict[str, np.ndarray]
Runner = Callable[[dict[str, np.ndarray]], Outputs]
#: Called once per batch run: (rows, join ns, run ns, split ns).
BatchHook = Callable[[int, int, int, int], None]


class _Request:
    __slots__ = ("enqueued", "error", "event", "future", "inputs", "loop", "result", "rows", "timing")

    def __init__(self, inputs: dict[str, np.ndarray], rows: int, timing: RequestTiming | None) -> None:
        self.inputs = inputs
        self.rows = rows
        self.timing = timing
        self.enqueued = time.monotonic()
        self.result: Outputs | None = None
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[Outputs] | None = None
        self.event: threading.Event | None = None


def _resolve_async(requests: list[_Request]) -> None:
    """Complete futures on their loop (called via call_soon_threadsafe)."""
    for req in requests:
        fut = req.future
        if fut is None or fut.done():  # the caller was cancelled
            continue
        if req.error is not None:
            fut.set_exception(req.error)
        else:
            fut.set_result(req.result)  # type: ignore[arg-type]


class Batcher:
    """Queues validated requests of one model and runs them in batches on a worker thread."""

    def __init__(
        self,
        name: str,
        run: Runner,
        *,
        max_batch_size: int,
        max_queue_delay_us: int,
        preferred_batch_sizes: tuple[int, ...] = (),
    ) -> None:
        self.name = name
        self._run = run
        self._max_batch = max_batch_size
        self._delay = max_queue_delay_us / 1e6
        self._preferred = preferred_batch_sizes
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._rows = 0  # rows queued, guarded by _cond
        #: Statistics hook, called on the worker thread after each batch run (set by the engine).
        self.on_batch: BatchHook | None = None
        self._thread = threading.Thread(target=self._work, name=f"edgert-batcher-{name}", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting to be batched."""
        return len(self._queue)

    def _enqueue(self, req: _Request) -> None:
        with self._cond:
            if self._stopping:
                raise BackendError(
                    f"model {self.name!r} is being replaced or removed", hint="retry the request"
                )
            self._queue.append(req)
            self._rows += req.rows
            # Wake the worker only when it has something to decide: the first request starts its
            # delay timer; a full or preferred-size batch can run at once. Waking it on every request
            # makes it fight the event loop for the GIL 32 times per batch.
            if len(self._queue) == 1 or self._rows >= self._max_batch or self._rows in self._preferred:
                self._cond.notify()

    def submit_async(
        self, inputs: dict[str, np.ndarray], rows: int, timing: RequestTiming | None = None
    ) -> asyncio.Future[Outputs]:
        """Queue a request from the running event loop; await the returned future.

        ``timing`` gets the request's queue wait and its batch's join, run and split times.
        """
        req = _Request(inputs, rows, timing)
        req.loop = asyncio.get_running_loop()
        req.future = req.loop.create_future()
        self._enqueue(req)
        return req.future

    def submit_sync(
        self, inputs: dict[str, np.ndarray], rows: int, timing: RequestTiming | None = None
    ) -> Outputs:
        """Queue a request from any thread and block until its outputs are ready."""
        req = _Request(inputs, rows, timing)
        req.event = threading.Event()
        self._enqueue(req)
        req.event.wait()
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def stop(self, error: BaseException | None = None) -> None:
        """Stop the worker after the queue drains; with ``error``, fail queued requests instead."""
        with self._cond:
            self._stopping = True
            if error is not None:
                pending = list(self._queue)
                self._queue.clear()
                self._rows = 0
            else:
                pending = []
            self._cond.notify_all()
        for req in pending:
            req.error = error
        self._complete(pending)
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_JOIN_TIMEOUT_S)

    def _next_batch(self) -> list[_Request] | None:
        with self._cond:
            while True:
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                rows = [r.rows for r in _head(self._queue, self._max_batch)]
                waited = time.monotonic() - self._queue[0].enqueued
                # A stopping batcher does not wait for company: drain as fast as possible.
                take = plan_batch(
                    rows, self._max_batch, self._preferred, waited >= self._delay or self._stopping
                )
                if take == WAIT:
                    self._cond.wait(self._delay - waited)
                    continue
                batch = [self._queue.popleft() for _ in range(take)]
                self._rows -= sum(r.rows for r in batch)
                return batch

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)
            self._complete(batch)

    def _execute(self, batch: list[_Request]) -> None:
        rows = [r.rows for r in batch]
        try:
            t0 = time.monotonic_ns()
            joined = join_inputs([r.inputs for r in batch])
            t1 = time.monotonic_ns()
            cpu0 = time.thread_time_ns() if any(r.timing is not None and r.timing.cpu for r in batch) else 0
            outputs = self._run(joined)
            cpu = (time.thread_time_ns() - cpu0) // len(batch) if cpu0 else 0
            t2 = time.monotonic_ns()
            for req, out in zip(batch, split_outputs(outputs, rows), strict=False):
                req.result = out
            _stamp(batch, t0, t1, t2, time.monotonic_ns(), sum(rows), cpu, self.on_batch)
        except BaseException as exc:  # a worker must never die; the error goes to the callers
            if len(batch) > 1:
                # Isolate the failure: run each request alone so one bad request fails only itself.
                for req in batch:
                    self._execute([req])
                return
            batch[0].error = _as_edgert(exc, self.name)

    def _complete(self, batch: list[_Request]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Request]] = {}
        for req in batch:
            if req.event is not None:
                req.event.set()
            elif req.loop is not None:
                by_loop.setdefault(req.loop, []).append(req)
        for loop, reqs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_async, reqs)
            except RuntimeError:  # the loop closed: nobody is waiting any more
                log.debug("dropping results for a closed event loop", extra={"model": self.name})


def _stamp(
    batch: list[_Request], t0: int, t1: int, t2: int, t3: int, rows: int, cpu: int, hook: BatchHook | None
) -> None:
    """Give each request its batch's join (t0-t1), run (t1-t2), split (t2-t3) and CPU share."""
    for req in batch:
        t = req.timing
        if t is not None:
            t.input_ns += t1 - t0
            t.infer_ns, t.output_ns, t.batch_size, t.batched = t2 - t1, t3 - t2, rows, True
            t.queue_ns = t0 - t.validated_ns
            if t.cpu:
                t.cpu_infer_ns += cpu
    if hook is not None:
        hook(rows, t1 - t0, t2 - t1, t3 - t2)


def _head(queue: deque[_Request], n: int) -> list[_Request]:
    out = []
    for req in queue:
        out.append(req)
        if len(out) >= n:
            break
    return out


def _as_edgert(exc: BaseException, name: str) -> BaseException:
    if isinstance(exc, EdgertError):
        return exc
    if not isinstance(exc, Exception):
        return exc
    return BackendError(f"model {name!r} failed while running: {type(exc).__name__}: {exc}")
