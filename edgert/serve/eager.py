"""Run a coroutine eagerly: to completion on the caller's stack when it never suspends, else as a task.

Most requests to a tiny unbatched model never suspend (the engine runs the model inline), yet an
``asyncio.Task`` per request costs a scheduling round trip through the loop (~25 us measured on the
digits model, as much as the model itself). :func:`start` drives the coroutine's first step
directly; only a coroutine that really waits (a batch, a thread pool, a swap) becomes a task, which
resumes it exactly where it stopped. Python 3.12's ``asyncio.eager_task_factory`` does the same for
a whole loop; this works on 3.10+ and only where we ask for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["Done", "start"]

T = TypeVar("T")


class Done(Generic[T]):
    """A coroutine that finished on its first step: its ``value``, or the ``error`` it raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: T | None = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error

    def result(self) -> T:
        """The value, or raise the error."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class _Resume(Generic[T]):
    """Awaitable that hands a suspended coroutine's pending future to a task, then continues it."""

    __slots__ = ("coro", "pending")

    def __init__(self, coro: Coroutine[Any, Any, T], pending: Any) -> None:
        self.coro = coro
        self.pending = pending

    def __await__(self) -> Generator[Any, Any, T]:
        pending = self.pending
        while True:
            try:
                # The task sees the same object the coroutine yielded (a future with
                # _asyncio_future_blocking set, or None for a bare yield) and waits on it.
                sent = yield pending
            except BaseException as exc:  # e.g. the task was cancelled: deliver it into the coroutine
                try:
                    pending = self.coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
                continue
            try:
                pending = self.coro.send(sent)
            except StopIteration as stop:
                return stop.value


async def _finish(coro: Coroutine[Any, Any, T], pending: Any) -> T:
    return await _Resume(coro, pending)


def start(coro: Coroutine[Any, Any, T]) -> Done[T] | asyncio.Task[T]:
    """Run ``coro`` until it first suspends: a :class:`Done` if it finished, else a task finishing it.

    Must be called from the running loop's thread (like ``asyncio.ensure_future``).
    """
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        return Done(stop.value)
    except BaseException as exc:  # handed to the caller exactly like a task's exception
        return Done(error=exc)
    return asyncio.get_running_loop().create_task(_finish(coro, pending))
