"""Hot swap under load and cascades, with real digits models."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from edgert import ModelOptions
from edgert.engine import DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD, CascadeConfig, Engine, ModelConfig
from edgert.engine.cascade import escalate_mask, evaluate
from edgert.errors import BackendError, ConfigError, InputError

from .conftest import MODELS, Instrumented, aio


async def _load_clients(engine: Engine, x: np.ndarray, stop: asyncio.Event, n: int) -> tuple[list, list]:
    versions: list[str] = []
    failures: list[BaseException] = []

    async def client(i: int) -> None:
        j = 0
        while not stop.is_set():
            try:
                r = await engine.infer("d", {"pixels": x[(i + j) % len(x)][None]})
                versions.append(r.model_version)
            except Exception as exc:  # any failure at all fails the test
                failures.append(exc)
            j += 1
            await asyncio.sleep(0)

    await asyncio.gather(*[client(i) for i in range(n)])
    return versions, failures


@pytest.mark.parametrize("batching", [0, 8])
@aio
async def test_swap_under_load_loses_nothing(engine: Engine, load, digits, batching: int) -> None:
    x, _ = digits
    old = Instrumented(load("digits_small_fp32.onnx", version="1"))
    engine.add_model(old, ModelConfig("d", max_batch_size=batching, max_queue_delay_us=200))
    stop = asyncio.Event()
    clients = asyncio.ensure_future(_load_clients(engine, x, stop, 16))
    while engine.metrics.stats_copy("d")["requests"] < 200:
        await asyncio.sleep(0.001)
    await engine.swap("d", load("digits_small_int8.onnx", version="2"))
    served_after = engine.metrics.stats_copy("d")["requests"]
    while engine.metrics.stats_copy("d")["requests"] < served_after + 200:
        await asyncio.sleep(0.001)
    stop.set()
    versions, failures = await clients
    assert failures == []
    assert "1" in versions and versions[-1] == "2"
    assert engine.get("d").version == "2"
    assert old.closed == 1  # in-flight requests finished on the old version, then it closed


@aio
async def test_failed_warm_up_keeps_old_version(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(load("digits_small_fp32.onnx", version="1"), ModelConfig("d"))
    broken = Instrumented(load("digits_small_int8.onnx", version="2"))
    broken.fail = True
    with pytest.raises(BackendError, match="warm-up of model"):
        await engine.swap("d", broken)
    assert broken.closed == 1
    assert engine.get("d").version == "1"
    assert (await engine.infer("d", {"pixels": x[:1]})).model_version == "1"


@aio
async def test_incompatible_swap_is_refused(engine: Engine, load, digits) -> None:
    x, _ = digits
    engine.add_model(load("digits_small_fp32.onnx", version="1"), ModelConfig("d"))
    with pytest.raises(ConfigError, match="inputs"):
        await engine.swap("d", load("mobilenetv2_int8.onnx", version="2"))
    assert (await engine.infer("d", {"pixels": x[:1]})).model_version == "1"


def _cascade_engine(engine: Engine, load, batching: int = 0) -> tuple:
    small, large = load("digits_small_fp32.onnx"), load("digits_large_fp32.onnx")
    engine.add_model(small, ModelConfig("small", max_batch_size=batching))
    engine.add_model(large, ModelConfig("large", max_batch_size=batching))
    engine.add_cascade(
        CascadeConfig("digits", "small", "large", DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD)
    )
    return small, large


@aio
async def test_cascade_escalates_only_uncertain_rows(engine: Engine, load, digits) -> None:
    x, _ = digits
    small, large = _cascade_engine(engine, load)
    x = x[:32]  # the profile's max batch
    result = await engine.infer("digits", {"pixels": x})
    s, big = small.run({"pixels": x})["logits"], large.run({"pixels": x})["logits"]
    mask = escalate_mask(s, DIGITS_DEFAULT_RULE, DIGITS_DEFAULT_THRESHOLD)
    assert 0 < mask.sum() < len(x)  # a real mix: some rows escalate, most do not
    got = result.outputs["logits"]
    np.testing.assert_allclose(got[~mask], s[~mask], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[mask], big[mask], rtol=1e-4, atol=1e-4)
    assert result.escalated and result.escalated_rows == int(mask.sum())
    cascade = engine.metrics.snapshot()["models"]["digits"]["cascade"]
    assert cascade["rows"] == len(x) and cascade["escalated"] == int(mask.sum())
    # The large model only ever saw the escalated rows, in one run.
    assert engine.metrics.stats_copy("large")["mean_batch_size"] == mask.sum()


@aio
async def test_cascade_input_errors_name_the_cascade_not_its_member(engine: Engine, load, digits) -> None:
    x, _ = digits
    small, _ = _cascade_engine(engine, load)
    wanted = r"model 'digits' expects inputs \['pixels'\], got \['image'\]"
    with pytest.raises(InputError, match=wanted) as info:
        await engine.infer("digits", {"image": x[:1]})
    assert small.name not in str(info.value) and "/v2/models/digits" in (info.value.hint or "")


def test_cascade_sync_and_batched_members(engine: Engine, load, digits) -> None:
    x, _ = digits
    small, large = _cascade_engine(engine, load, batching=32)
    for i in range(20):
        r = engine.infer_sync("digits", {"pixels": x[i : i + 1]})
        s = small.run({"pixels": x[i : i + 1]})["logits"]
        want = large.run({"pixels": x[i : i + 1]})["logits"] if r.escalated else s
        np.testing.assert_allclose(r.outputs["logits"], want, rtol=1e-4, atol=1e-4)
    assert engine.get("digits").kind == "cascade"


def test_cascade_config_errors(engine: Engine, load) -> None:
    _cascade_engine(engine, load)
    with pytest.raises(ConfigError, match="unknown member"):
        engine.add_cascade(CascadeConfig("c2", "small", "missing", "margin", 0.5))
    with pytest.raises(ConfigError, match="no output"):
        engine.add_cascade(CascadeConfig("c3", "small", "large", "margin", 0.5, output="probs"))
    with pytest.raises(ConfigError, match="rule must be"):
        CascadeConfig("c4", "small", "large", "entropy", 0.5)
    with pytest.raises(ConfigError, match="used by cascade"):
        engine.remove("small")


def test_default_threshold_meets_target_on_held_out_split(runtime, digits) -> None:
    """Within 0.3 pt of the large model's accuracy at <= 50% of its FLOPs (models/cards.json)."""
    x, y = digits
    cards = json.loads((MODELS / "cards.json").read_text())["models"]
    for precision in ("fp32", "int8"):
        opts = ModelOptions(max_batch=len(x))
        small = runtime.load(MODELS / f"digits_small_{precision}.onnx", options=opts)
        large = runtime.load(MODELS / f"digits_large_{precision}.onnx", options=opts)
        choice = evaluate(
            small.run({"pixels": x})["logits"],
            large.run({"pixels": x})["logits"],
            y,
            DIGITS_DEFAULT_RULE,
            DIGITS_DEFAULT_THRESHOLD,
            cards[f"digits_small_{precision}.onnx"]["flops_per_sample"],
            cards[f"digits_large_{precision}.onnx"]["flops_per_sample"],
        )
        assert choice.accuracy >= choice.large_accuracy - 0.003, (precision, choice)
        assert choice.relative_compute <= 0.5, (precision, choice)
