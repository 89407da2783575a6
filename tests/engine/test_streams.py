"""Stream sessions (pure parts with fakes; one real engine run): policies, order, drops, lag, ends."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.engine import Engine, ModelConfig
from edgert.engine.stream_plan import StreamOptions, StreamPlan
from edgert.engine.streams import PendingQueue, StreamItem, StreamResult, StreamSession
from edgert.errors import InputError, OverloadedError
from edgert.metrics import Metrics

from .conftest import aio

AUDIO = SimpleNamespace(name="audio", dtype=np.dtype(np.float32), shape=(None, 1, 16000))
PIXELS = SimpleNamespace(name="pixels", dtype=np.dtype(np.float32), shape=(None, 1, 8, 8))


def item(i: int, at: float = 0.0) -> StreamItem:
    return StreamItem(i, None, at, {})


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(["all", "latest", "drop-oldest"]),
    capacity=st.integers(1, 6),
    ops=st.lists(st.booleans(), max_size=80),
)
def test_queue_accounts_for_every_item(policy: str, capacity: int, ops: list[bool]) -> None:
    q = PendingQueue(policy, capacity, None)
    offered, taken = 0, []
    for push in ops:
        if push:
            if policy == "all" and q.full():
                continue  # the transport stops reading: the sender is held, nothing is offered
            q.offer(item(offered))
            offered += 1
        else:
            got, _ = q.take(0.0)
            if got is not None:
                taken.append(got.id)
    assert offered == len(taken) + q.dropped_total + len(q)
    assert taken == sorted(taken)  # order is kept
    assert len(q) <= (1 if policy == "latest" else capacity)
    if policy == "all":
        assert q.dropped_total == 0


def test_latest_keeps_only_the_newest_and_drop_oldest_the_last_n() -> None:
    latest = PendingQueue("latest", 8, None)
    oldest = PendingQueue("drop-oldest", 3, None)
    for i in range(10):
        latest.offer(item(i))
        oldest.offer(item(i))
    assert [it.id for it in latest.items] == [9] and latest.dropped_total == 9
    assert [it.id for it in oldest.items] == [7, 8, 9] and oldest.dropped_total == 7
    assert latest.take(0.0)[0].dropped == 9  # charged to the next item taken


def test_deadline_drops_items_not_started_in_time() -> None:
    q = PendingQueue("all", 8, deadline_s=0.1)
    for i, at in enumerate([0.0, 0.05, 0.2]):
        q.offer(item(i, at))
    got, expired = q.take(now=0.21)
    assert got is not None and got.id == 2 and expired == 2 and got.dropped == 2 and q.dropped_total == 2


def test_requeue_under_latest_prefers_a_newer_item() -> None:
    q = PendingQueue("latest", 1, None)
    q.offer(item(2))
    assert q.requeue(item(1)) == 1 and [it.id for it in q.items] == [2]
    q2 = PendingQueue("all", 2, None)
    q2.offer(item(2))
    q2.requeue(item(1))
    assert [it.id for it in q2.items] == [1, 2]


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"policy": "newest"}, "policy must be one of"),
        ({"queue": 0}, "'queue' must be an integer from 1"),
        ({"deadline_ms": -1}, "deadline_ms must be a positive"),
        ({"hop": 10}, "'hop' needs 'window'"),
        ({"colour": 1}, "unknown stream option"),
        ({"idle_timeout_s": 1e9}, "idle_timeout_s must be a number"),
    ],
)
def test_bad_options_name_the_option(doc: dict[str, Any], words: str) -> None:
    with pytest.raises(InputError, match=words):
        StreamOptions.from_doc("m", doc)


def test_plan_checks_window_against_the_model_and_the_cap() -> None:
    ok = StreamPlan.bind(StreamOptions.from_doc("a", {"window": 16000, "hop": 1600}), [AUDIO], 1 << 20)
    assert ok.input == "audio" and ok.batched and ok.item_shape == (1, None) and ok.window is not None
    assert ok.window.axis == 1
    with pytest.raises(InputError, match="takes 16000 samples along axis 1"):
        StreamPlan.bind(StreamOptions.from_doc("a", {"window": 8000}), [AUDIO], 1 << 20)
    with pytest.raises(InputError, match="over the 1000-byte frame cap"):
        StreamPlan.bind(StreamOptions.from_doc("a", {"window": 16000}), [AUDIO], 1000)
    with pytest.raises(InputError, match="has no input 'x'"):
        StreamPlan.bind(StreamOptions.from_doc("a", {"input": "x"}), [AUDIO], 1 << 20)


class FakeEngine:
    """An infer that answers in call order once released (a fake for the pure session logic)."""

    def __init__(self) -> None:
        self.calls: list[Any] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.overload_next = 0

    async def infer(self, name: str, inputs: dict[str, np.ndarray], **kw: Any) -> Any:
        if self.overload_next:
            self.overload_next -= 1
            raise OverloadedError("busy", retry_after=0.001)
        await self.gate.wait()
        x = next(iter(inputs.values()))
        self.calls.append(float(x.reshape(-1)[0]))
        return SimpleNamespace(outputs={"y": x.sum(keepdims=True)})


def open_session(
    opts: dict[str, Any], fake: FakeEngine, spec: Any = PIXELS
) -> tuple[StreamSession, list[StreamResult]]:
    out: list[StreamResult] = []
    plan = StreamPlan.bind(StreamOptions.from_doc("m", opts), [spec], 1 << 24)
    return StreamSession(plan, fake.infer, out.append), out


def pixels(v: float) -> dict[str, np.ndarray]:
    return {"pixels": np.full((1, 8, 8), v, np.float32)}


async def until(cond: Any) -> None:
    for _ in range(100_000):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


@aio
async def test_latest_runs_the_freshest_item_and_reports_what_it_dropped() -> None:
    fake = FakeEngine()
    session, out = open_session({"policy": "latest"}, fake)
    task = asyncio.ensure_future(session.run())
    fake.gate.clear()
    session.push(0, 10.0, pixels(0))
    await until(lambda: session.queue.items == deque_empty())
    for i in range(1, 6):
        session.push(i, 10.0 + i, pixels(i))  # 1..4 are replaced by 5 while 0 runs
    fake.gate.set()
    await until(lambda: len(out) == 2)
    session.close()
    end = await task
    assert [r.id for r in out] == [0, 5] and [r.dropped for r in out] == [0, 4]
    assert out[1].ts == 15.0 and out[1].lag_s >= 0 and fake.calls == [0.0, 5.0]
    assert end.reason == "closed" and end.dropped == 4 and end.results == 2


def deque_empty() -> Any:
    from collections import deque

    return deque()


@aio
async def test_all_answers_every_item_in_order_and_signals_room() -> None:
    fake = FakeEngine()
    rooms: list[int] = []
    session, out = open_session({"policy": "all", "queue": 2}, fake)
    session._on_space = lambda: rooms.append(len(session.queue))
    fake.gate.clear()
    task = asyncio.ensure_future(session.run())
    for i in range(3):
        session.push(i, None, pixels(i))
    assert session.full()
    fake.gate.set()
    session.close()
    end = await task
    assert [r.id for r in out] == [0, 1, 2] and all(r.dropped == 0 for r in out) and rooms
    assert end.results == 3 and end.dropped == 0


@aio
async def test_push_after_close_is_refused_with_a_clear_error() -> None:
    session, _ = open_session({}, FakeEngine())
    session.close()
    with pytest.raises(InputError, match="after the stream was closed"):
        session.push(1, None, pixels(1))
    assert (await session.run()).reason == "closed"


@aio
async def test_overloaded_items_wait_and_are_retried() -> None:
    fake = FakeEngine()
    fake.overload_next = 3
    session, out = open_session({"policy": "all"}, fake)
    task = asyncio.ensure_future(session.run())
    session.push("a", None, pixels(1))
    session.close()
    await task
    assert [r.id for r in out] == ["a"] and out[0].error is None and fake.calls == [1.0]


@aio
async def test_a_window_result_every_hop_carries_the_completing_chunk() -> None:
    fake = FakeEngine()
    session, out = open_session({"window": 16000, "hop": 1600}, fake, AUDIO)
    task = asyncio.ensure_future(session.run())
    for i in range(120):
        session.push(i, i * 0.01, {"audio": np.full((1, 160), i, np.float32)})
    with pytest.raises(InputError, match="expected float32 with shape \\[1, \\*\\], got float64"):
        session.push(999, None, {"audio": np.zeros((1, 160), np.float64)})
    session.close()
    await task
    assert [r.id for r in out] == [99, 109, 119]
    assert fake.calls == [0.0, 10.0, 20.0]  # windows start at 0, 1600, 3200 samples


@aio
async def test_idle_stream_ends_by_itself() -> None:
    session, _ = open_session({"idle_timeout_s": 0.05}, FakeEngine())
    assert (await session.run()).reason == "idle"


@aio
async def test_stream_over_a_real_engine_matches_requests_and_counts_metrics(load, digits) -> None:
    x, _ = digits
    metrics = Metrics()
    engine = Engine(metrics)
    try:
        engine.add_model(load("digits_small_fp32.onnx"), ModelConfig("d", max_batch_size=8))
        spec = SimpleNamespace(name="pixels", dtype=np.dtype(np.float32), shape=(None, 64))
        out: list[StreamResult] = []
        plan = StreamPlan.bind(StreamOptions.from_doc("d", {"policy": "all"}), [spec], 1 << 20)
        session = StreamSession(plan, engine.infer, out.append, observer=metrics.streams)
        task = asyncio.ensure_future(session.run())
        await until(lambda: metrics.streams.open_streams().get("d") == 1.0)
        for i in range(20):
            session.push(i, None, {"pixels": x[i]})
        session.close()
        await task
        assert [r.id for r in out] == list(range(20)) and all(r.error is None for r in out)
        for i, r in enumerate(out):
            want = (await engine.infer("d", {"pixels": x[i : i + 1]})).outputs
            for k, v in want.items():
                np.testing.assert_allclose(r.outputs[k], v, rtol=1e-5, atol=1e-6)
        assert metrics.streams.open_streams()["d"] == 0.0
        text = metrics.render_prometheus().decode()
        assert 'edgert_streams_open{model="d"} 0' in text and "edgert_stream_lag_seconds" in text
        assert metrics.stats_copy("d")["requests"] >= 40  # stream items went through Engine.infer
    finally:
        engine.close()


@aio
async def test_streams_hold_one_admission_slot_each_and_retry_when_refused(
    engine: Engine, load, digits
) -> None:
    from .conftest import Instrumented

    x, _ = digits
    model = Instrumented(load("digits_small_fp32.onnx"))
    engine.add_model(
        model, ModelConfig("d", max_batch_size=2, max_queue_delay_us=0, max_in_flight=4, max_queue=100)
    )
    spec = SimpleNamespace(name="pixels", dtype=np.dtype(np.float32), shape=(None, 64))
    model.gate.clear()  # runs block: whatever is admitted stays in flight
    outs: list[list[StreamResult]] = [[] for _ in range(4)]
    sessions = [
        StreamSession(
            StreamPlan.bind(StreamOptions.from_doc("d", {"queue": 64}), [spec], 1 << 20),
            engine.infer,
            o.append,
        )
        for o in outs
    ]
    tasks = [asyncio.ensure_future(s.run()) for s in sessions[:3]]
    for s in sessions[:3]:
        for i in range(20):
            s.push(i, None, {"pixels": x[i]})
    await until(lambda: engine.metrics.snapshot()["models"]["d"]["in_flight"] == 3)
    request = asyncio.ensure_future(engine.infer("d", {"pixels": x[:1]}))  # requests still get a slot
    await until(lambda: engine.metrics.snapshot()["models"]["d"]["in_flight"] == 4)
    with pytest.raises(OverloadedError):
        await engine.infer("d", {"pixels": x[:1]})
    tasks.append(asyncio.ensure_future(sessions[3].run()))  # a stream refused at the limit waits and retries
    sessions[3].push("late", None, {"pixels": x[0]})
    for _ in range(50):
        await asyncio.sleep(0)
    assert engine.metrics.snapshot()["models"]["d"]["in_flight"] == 4 and outs[3] == []
    model.gate.set()
    assert (await request).outputs["logits"].shape == (1, 10)
    for s in sessions:
        s.close()
    ends = await asyncio.gather(*tasks)
    assert [len(o) for o in outs] == [20, 20, 20, 1] and all(e.dropped == 0 for e in ends)
    assert all([r.id for r in o] == list(range(20)) for o in outs[:3]) and outs[3][0].id == "late"
