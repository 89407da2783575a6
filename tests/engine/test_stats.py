"""Per-version statistics recorded by the engine with real digits models (swaps, removal, refusals)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from edgert.engine import Engine, ModelConfig
from edgert.errors import OverloadedError, UnknownModelError
from edgert.metrics.timing import RequestTiming

from .conftest import Instrumented, aio


def served(engine: Engine) -> list[tuple[str, str]]:
    return [(i.name, v) for i in engine.models() if i.kind == "model" for v in i.versions]


def one(engine: Engine, name: str, version: str | None = None) -> dict:
    (doc,) = engine.stats.model_stats(served(engine), name, version)["model_stats"]
    return doc


@aio
async def test_a_swap_keeps_each_versions_counts(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(load("digits_small_int8.onnx", "1"), ModelConfig("d"))
    for i in range(3):
        engine.infer_sync("d", {"pixels": x[i : i + 1]})  # threads' path
    await engine.swap("d", load("digits_small_int8.onnx", "2"))
    for i in range(5):
        await engine.infer("d", {"pixels": x[i : i + 2]})  # the event loop's path
    docs = engine.stats.model_stats(served(engine), "d")["model_stats"]
    counts = {d["version"]: (d["inference_stats"]["success"]["count"], d["inference_count"]) for d in docs}
    assert counts == {"1": (3, 3), "2": (5, 10)}
    assert one(engine, "d", "1")["execution_count"] == 3
    with pytest.raises(UnknownModelError, match=r"version '3'.*\['1', '2'\]"):
        engine.stats.model_stats(served(engine), "d", "3")
    engine.remove("d")
    with pytest.raises(UnknownModelError, match="'d'"):
        engine.stats.model_stats(served(engine), "d")


def test_threads_batch_and_every_row_runs_once(engine: Engine, load, digits) -> None:
    x, _ = digits
    config = ModelConfig("b", max_batch_size=8, max_queue_delay_us=5000)
    engine.add_model(load("digits_small_int8.onnx"), config)
    timings = [RequestTiming() for _ in range(24)]

    def call(i: int) -> None:
        engine.infer_sync("b", {"pixels": x[i : i + 1]}, timing=timings[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    doc = one(engine, "b")
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in doc["batch_stats"]}
    assert sum(size * n for size, n in sizes.items()) == 24 == doc["inference_count"]
    assert doc["execution_count"] == sum(sizes.values())
    # Each caller's record names the batch that served it and its share of the wait.
    assert all(t.batched and t.batch_size in sizes and t.infer_ns > 0 for t in timings)
    assert sum(t.batch_size for t in timings) == sum(size * size * n for size, n in sizes.items())


@aio
async def test_refused_and_invalid_requests_are_failures(engine: Engine, load, digits) -> None:
    x, _ = digits
    model = Instrumented(load("digits_small_int8.onnx"))
    engine.add_model(model, ModelConfig("d", max_batch_size=2, max_queue_delay_us=0, max_in_flight=2))
    model.gate.clear()  # runs block: the first two requests hold both slots
    held = [asyncio.ensure_future(engine.infer("d", {"pixels": x[i : i + 1]})) for i in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError):
        await engine.infer("d", {"pixels": x[:1]})
    model.gate.set()
    await asyncio.gather(*held)
    with pytest.raises(Exception, match="pixels"):
        await engine.infer("d", {"pixels": x[:1, :10]})
    inf = one(engine, "d")["inference_stats"]
    assert (inf["success"]["count"], inf["fail"]["count"]) == (2, 2)


def test_an_unload_for_room_keeps_the_models_counts(engine: Engine, load, digits) -> None:
    """A memory-budget unload and cold load again continue the counts (Triton stats and Prometheus)."""
    x, _ = digits
    engine.add_model(load("digits_small_int8.onnx", "1"), ModelConfig("d"))
    for i in range(3):
        engine.infer_sync("d", {"pixels": x[i : i + 1]})
    engine.remove("d", keep_stats=True)
    engine.add_model(load("digits_small_int8.onnx", "1"), ModelConfig("d"))
    engine.infer_sync("d", {"pixels": x[:1]})
    assert one(engine, "d")["inference_stats"]["success"]["count"] == 4
    assert "d" in engine.metrics.models()
    text = engine.metrics.render_prometheus().decode()
    assert 'edgert_requests_total{model="d"} 4' in text, [
        line for line in text.splitlines() if line.startswith("edgert_requests_total")
    ]
