"""Engine with real digits models: batching, cache, admission, errors, supervision, sync callers."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from edgert.engine import Engine, ModelConfig
from edgert.errors import ConfigError, InputError, OverloadedError, UnknownModelError

from .conftest import Instrumented, aio

# Long enough that a batch only runs because it is full, never because the delay expired.
NEVER_US = 30_000_000


async def wait_until(condition, limit_s: float = 30.0) -> None:
    """Poll ``condition`` (a liveness wait, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


def batch_counts(engine: Engine, name: str) -> dict:
    return engine.metrics.stats_copy(name)["batch_sizes"]


@aio
async def test_concurrent_clients_get_their_own_rows(engine: Engine, load, digits) -> None:
    x, _ = digits
    model = load("digits_small_fp32.onnx")
    engine.add_model(model, ModelConfig("d", max_batch_size=16, max_queue_delay_us=2000))
    sizes = [1 + (i % 3) for i in range(40)]
    starts = np.cumsum([0, *sizes[:-1]])
    results = await asyncio.gather(
        *[engine.infer("d", {"pixels": x[s : s + n]}) for s, n in zip(starts, sizes, strict=True)]
    )
    for s, n, r in zip(starts, sizes, results, strict=True):
        np.testing.assert_allclose(
            r.outputs["logits"], model.run({"pixels": x[s : s + n]})["logits"], rtol=1e-5, atol=1e-5
        )
        assert r.model_name == "d" and r.model_version == "1" and not r.cached


@aio
async def test_batches_form_under_concurrency(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(
        load("digits_small_fp32.onnx"), ModelConfig("d", max_batch_size=8, max_queue_delay_us=NEVER_US)
    )
    before = engine.metrics.stats_copy("d")["mean_batch_size"]  # warm-up runs are not counted
    assert before is None
    await asyncio.gather(*[engine.infer("d", {"pixels": x[i : i + 1]}) for i in range(16)])
    # With a delay that never expires, only full batches can run: exactly two batches of 8.
    assert batch_counts(engine, "d") == {"8": 2}


def test_sync_callers_from_threads_are_batched(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(
        load("digits_small_fp32.onnx"),
        ModelConfig("d", max_batch_size=4, max_queue_delay_us=NEVER_US, preferred_batch_sizes=(4,)),
    )
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        results[i] = engine.infer_sync("d", {"pixels": x[i : i + 1]}).outputs["logits"]

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batch_counts(engine, "d") == {"4": 2}
    assert len(results) == 8


@aio
async def test_unbatched_tiny_model_runs_inline_and_slow_one_in_pool(engine: Engine, load) -> None:
    engine.add_model(load("digits_small_fp32.onnx"), ModelConfig("small"))
    engine.add_model(load("mobilenetv2_int8.onnx"), ModelConfig("mobile"))
    assert engine._served["small"].inline
    assert not engine._served["mobile"].inline  # ~ms per run: must not block the event loop
    out = await engine.infer("mobile", {"input": np.zeros((1, 3, 224, 224), np.float32)})
    assert out.outputs["logits"].shape == (1, 1000)


@aio
async def test_result_cache_hits_and_misses(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(load("digits_small_fp32.onnx"), ModelConfig("d", cache_bytes=1 << 20))
    first = await engine.infer("d", {"pixels": x[:2]})
    second = await engine.infer("d", {"pixels": x[:2].copy()})
    third = await engine.infer("d", {"pixels": x[2:4]})
    assert not first.cached and second.cached and not third.cached
    np.testing.assert_array_equal(first.outputs["logits"], second.outputs["logits"])
    cache = engine.metrics.stats_copy("d")["cache"]
    assert (cache["hits"], cache["misses"]) == (1, 2)
    # A cached entry cannot be corrupted by a caller mutating its result.
    with pytest.raises(ValueError):
        second.outputs["logits"][0, 0] = 1.0


@aio
async def test_overload_is_refused_and_bounded(engine: Engine, load, digits) -> None:
    x, _ = digits
    model = Instrumented(load("digits_small_fp32.onnx"))
    engine.add_model(
        model, ModelConfig("d", max_batch_size=2, max_queue_delay_us=0, max_in_flight=4, max_queue=100)
    )
    model.gate.clear()  # the worker blocks inside run: requests pile up
    tasks = [asyncio.ensure_future(engine.infer("d", {"pixels": x[i : i + 1]})) for i in range(50)]
    await asyncio.sleep(0)  # let every task reach admission
    refused = [t for t in tasks if t.done() and isinstance(t.exception(), OverloadedError)]
    assert len(refused) == 46
    assert all(t.exception().retry_after > 0 for t in refused)
    snap = engine.metrics.snapshot()["models"]["d"]
    assert snap["in_flight"] == 4
    assert snap["errors"] == {"overloaded": 46}
    # Supervision: a run is in progress with no progress; it is stalled once the limit passes.
    await wait_until(lambda: engine.progress()["d"].running == 1)
    assert engine.stalled(time.monotonic() + 60, limit_s=30) == ["d"]
    model.gate.set()
    done = await asyncio.gather(*[t for t in tasks if t not in refused])
    assert len(done) == 4
    assert engine.stalled(time.monotonic() + 60, limit_s=30) == []


@aio
async def test_queue_depth_is_bounded(engine: Engine, load, digits) -> None:
    x, _ = digits
    model = Instrumented(load("digits_small_fp32.onnx"))
    engine.add_model(
        model, ModelConfig("d", max_batch_size=1, max_queue_delay_us=0, max_in_flight=1000, max_queue=3)
    )
    model.gate.clear()
    tasks = [asyncio.ensure_future(engine.infer("d", {"pixels": x[:1]})) for i in range(30)]
    await asyncio.sleep(0)
    refused = sum(1 for t in tasks if t.done() and isinstance(t.exception(), OverloadedError))
    assert engine.metrics.snapshot()["models"]["d"]["queue_depth"] <= 3
    assert refused >= 30 - 4  # at most 3 queued + 1 taken by the worker
    model.gate.set()
    await asyncio.gather(*tasks, return_exceptions=True)


@aio
async def test_errors_are_clear_and_counted(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(load("digits_small_fp32.onnx"), ModelConfig("d", nan_policy="reject"))
    with pytest.raises(UnknownModelError, match="served models: \\['d'\\]") as info:
        await engine.infer("nope", {"pixels": x[:1]})
    assert type(info.value) is UnknownModelError  # the one class (edgert.errors), not a per-layer copy
    with pytest.raises(UnknownModelError, match="no version '7'"):
        await engine.infer("d", {"pixels": x[:1]}, version="7")
    with pytest.raises(InputError, match="missing"):
        await engine.infer("d", {"image": x[:1]})
    with pytest.raises(InputError, match="NaN"):
        await engine.infer("d", {"pixels": np.full((1, 64), np.nan, np.float32)})
    with pytest.raises(InputError, match="no output"):
        await engine.infer("d", {"pixels": x[:1]}, outputs=["probs"])
    assert engine.metrics.stats_copy("d")["errors"] == {"input": 3}
    # Bad requests lose nothing: the model still serves.
    assert (await engine.infer("d", {"pixels": x[:1]}, outputs=["logits"])).outputs["logits"].shape == (1, 10)


def test_registry_operations(engine: Engine, load) -> None:
    model = Instrumented(load("digits_small_fp32.onnx"))
    engine.add_model(model, ModelConfig("d", max_batch_size=8))
    info = engine.get("d")
    assert (info.version, info.provider, info.max_batch_size, info.ready) == (
        "1",
        "CPUExecutionProvider",
        8,
        True,
    )
    with pytest.raises(ConfigError, match="already served"):
        engine.add_model(model, ModelConfig("d"))
    with pytest.raises(UnknownModelError):
        engine.get("d", version="2")
    engine.remove("d")
    assert model.closed == 1
    assert engine.models() == []
    with pytest.raises(UnknownModelError):
        engine.infer_sync("d", {"pixels": np.zeros((1, 64), np.float32)})


def test_batching_needs_a_dynamic_batch_dim(engine: Engine, load) -> None:
    model = Instrumented(load("digits_small_fp32.onnx"))
    spec = model.inputs[0]
    model.inputs = [type(spec)(spec.name, spec.dtype, (1, 64))]  # as a fixed-batch export would declare
    with pytest.raises(ConfigError, match="dynamic batch dimension"):
        engine.add_model(model, ModelConfig("d", max_batch_size=8))


@aio
async def test_drain_stops_admission(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(load("digits_small_fp32.onnx"), ModelConfig("d"))
    await engine.infer("d", {"pixels": x[:1]})
    await engine.drain(timeout=1.0)
    with pytest.raises(OverloadedError, match="shutting down"):
        await engine.infer("d", {"pixels": x[:1]})
    assert not engine.get("d").ready
