"""The eager coroutine start used by the servers: finish inline when possible, else a task resumes it."""

from __future__ import annotations

import asyncio

import pytest

from edgert.serve import eager


async def _no_wait(x: int) -> int:
    return x * 2


async def _fails() -> int:
    raise ValueError("bad")


async def _waits(fut: asyncio.Future[int], log: list[str]) -> int:
    log.append("before")
    got = await fut
    log.append("after")
    await asyncio.sleep(0)  # a bare yield, then more awaits
    return got + 1


def test_coroutine_that_never_suspends_finishes_inline():
    async def main() -> None:
        tasks_before = len(asyncio.all_tasks())
        started = eager.start(_no_wait(21))
        assert isinstance(started, eager.Done)
        assert started.result() == 42
        assert len(asyncio.all_tasks()) == tasks_before  # no task was made

    asyncio.run(main())


def test_error_on_the_first_step_is_returned_not_raised():
    async def main() -> None:
        started = eager.start(_fails())
        assert isinstance(started, eager.Done)
        assert isinstance(started.error, ValueError)
        with pytest.raises(ValueError, match="bad"):
            started.result()

    asyncio.run(main())


def test_suspending_coroutine_is_resumed_by_a_task_where_it_stopped():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int] = loop.create_future()
        log: list[str] = []
        started = eager.start(_waits(fut, log))
        assert isinstance(started, asyncio.Task)
        assert log == ["before"]  # the first step ran eagerly, exactly once
        loop.call_later(0.01, fut.set_result, 1)
        assert await started == 2
        assert log == ["before", "after"]

    asyncio.run(main())


def test_cancelling_the_task_reaches_the_coroutine():
    cleaned: list[bool] = []

    async def guarded(fut: asyncio.Future[int]) -> int:
        try:
            return await fut
        finally:
            cleaned.append(True)

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        started = eager.start(guarded(fut))
        assert isinstance(started, asyncio.Task)
        await asyncio.sleep(0)
        started.cancel()
        with pytest.raises(asyncio.CancelledError):
            await started
        assert cleaned == [True] and fut.cancelled()

    asyncio.run(main())


def test_error_after_suspending_propagates_through_the_task():
    async def late(fut: asyncio.Future[int]) -> int:
        await fut
        raise KeyError("late")

    async def main() -> None:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        started = eager.start(late(fut))
        assert isinstance(started, asyncio.Task)
        fut.set_result(0)
        with pytest.raises(KeyError):
            await started

    asyncio.run(main())
