"""ShadowRunner and ShadowStats with real models: agreement, latency ratio, sampling, a failing candidate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert.device.shadow import QUEUE_SIZE, ShadowRunner, ShadowStats, shadow_event
from edgert.runtime import Runtime
from tests.device.models_kit import MODELS, fails_at_run

WAIT_S = 60.0


@pytest.fixture(scope="module")
def runtime() -> Runtime:
    return Runtime("cpu-generic")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return np.load(MODELS / "digits_test.npz")["x"]


def _feed(runner: ShadowRunner, active: object, x: np.ndarray, rows: int = 1) -> int:
    """Offer every ``rows``-row slice of ``x`` as a served request (served by ``active``); how many queued."""
    queued = 0
    for i in range(0, len(x), rows):
        inputs = {"pixels": x[i:i + rows]}
        out = active.run(active.validate(inputs))  # type: ignore[attr-defined]
        queued += runner.offer(inputs, out, 0.001)
        assert runner.wait_idle(WAIT_S)  # one at a time: this test is about the comparison, not the queue
    return queued


def test_small_vs_large_agree_mostly_but_not_always(runtime: Runtime, digits: np.ndarray) -> None:
    active = runtime.load(MODELS / "digits_small_int8.onnx", name="digits", version="1")
    candidate = runtime.load(MODELS / "digits_large_int8.onnx", name="digits", version="2")
    runner = ShadowRunner(candidate, name="digits", version="2", percent=100.0, rollout="r1")
    runner.start()
    try:
        assert _feed(runner, active, digits) == len(digits)
        snap = runner.snapshot()
    finally:
        runner.close()
        active.close()
    # The truth, computed here without the runner: top-1 of both models on all 360 digits.
    small, large = (np.concatenate([m.run({"pixels": digits[i:i + 1]})["logits"] for i in range(len(digits))]
                                   ).argmax(1)
                    for m in (runtime.load(MODELS / f"digits_{s}_int8.onnx") for s in ("small", "large")))
    expected = float(np.mean(small == large))
    assert 0.8 < expected < 1.0
    assert snap["samples"] == len(digits) and snap["errors"] == 0 and snap["skipped"] == 0
    assert snap["agreement"] == pytest.approx(expected) and snap["top1"] == pytest.approx(expected)
    assert snap["mean_abs_diff"] is None  # logits are classification-like
    assert snap["latency_ratio"] is not None and snap["latency_ratio"] > 0
    event = shadow_event(runner, snap, seq=7)
    assert event is not None and event["event"] == "shadow" and event["rollout"] == "r1"
    assert (event["model"], event["version"], event["samples"], event["seq"]) == ("digits", "2", 360, 7)
    print(f"\nsmall int8 vs large int8 on {len(digits)} digits: agreement {snap['agreement']:.4f}, "
          f"latency ratio {snap['latency_ratio']:.3f}")


def test_same_model_agrees_fully_and_batches_count_rows(runtime: Runtime, digits: np.ndarray) -> None:
    active = runtime.load(MODELS / "digits_small_int8.onnx", name="digits", version="1")
    candidate = runtime.load(MODELS / "digits_small_int8.onnx", name="digits", version="1b")
    runner = ShadowRunner(candidate, name="digits", version="1b", percent=100.0)
    runner.start()
    try:
        _feed(runner, active, digits, rows=8)
        snap = runner.snapshot()
    finally:
        runner.close()
        active.close()
    assert snap["samples"] == len(digits) // 8 and snap["agreement"] == 1.0 and snap["errors"] == 0


def test_broken_candidate_counts_errors_and_leaves_the_caller_alone(
        runtime: Runtime, digits: np.ndarray, tmp_path: Path) -> None:
    active = runtime.load(MODELS / "digits_small_int8.onnx", name="digits", version="1")
    broken = runtime.load(fails_at_run(tmp_path / "broken.onnx"), name="digits", version="9")
    runner = ShadowRunner(broken, name="digits", version="9", percent=50.0)
    runner.start()
    try:
        served = []
        for i in range(40):
            inputs = {"pixels": digits[i:i + 1]}
            out = active.run(active.validate(inputs))
            runner.offer(inputs, out, 0.001)  # returns, whatever the candidate does
            served.append(out["logits"])
            assert runner.wait_idle(WAIT_S)
        snap = runner.snapshot()
    finally:
        runner.close()
    want = np.concatenate([active.run({"pixels": digits[i:i + 1]})["logits"] for i in range(40)])
    active.close()
    np.testing.assert_array_equal(np.concatenate(served), want)
    assert (snap["offered"], snap["sampled"], snap["errors"], snap["samples"]) == (40, 20, 20, 0)
    assert snap["agreement"] is None and shadow_event(runner, snap) is None


class _Gate:
    """A candidate whose runs wait on an event (unit test of queue bounds; pure logic, no model)."""

    def __init__(self) -> None:
        import threading

        self.go = threading.Event()
        self.closed = False

    def validate(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return inputs

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert self.go.wait(WAIT_S)
        return {"y": inputs["x"]}

    def close(self) -> None:
        self.closed = True


def test_full_queue_skips_and_counts_never_blocks() -> None:
    gate = _Gate()
    runner = ShadowRunner(gate, name="m", version="2", percent=100.0)
    runner.start()
    x = {"x": np.ones((1, 3), np.float32)}
    results = [runner.offer(x, {"y": x["x"]}, 0.001) for _ in range(QUEUE_SIZE + 20)]
    # One sample is taken by the blocked worker (or still queued), QUEUE_SIZE wait: the rest are skipped.
    assert QUEUE_SIZE <= sum(results) <= QUEUE_SIZE + 1
    assert runner.snapshot()["skipped"] == len(results) - sum(results)
    gate.go.set()
    assert runner.wait_idle(WAIT_S)
    snap = runner.snapshot()
    assert snap["samples"] == sum(results) and snap["agreement"] == 1.0
    runner.close()
    assert gate.closed


@pytest.mark.parametrize("percent,expected", [(0.0, 0), (10.0, 10), (12.5, 12), (50.0, 50), (100.0, 100)])
def test_sampling_is_deterministic(percent: float, expected: int) -> None:
    gate = _Gate()
    gate.go.set()
    runner = ShadowRunner(gate, name="m", version="2", percent=percent, queue_size=200)
    x = {"x": np.ones((1, 3), np.float32)}
    assert sum(runner.offer(x, {"y": x["x"]}, 0.001) for _ in range(100)) == expected
    runner.close()


def test_stats_regression_and_shape_mismatch() -> None:
    stats = ShadowStats(window=4)
    a = {"y": np.array([1.0, 2.0, 3.0], np.float32)}
    stats.observe(a, {"y": np.array([1.0, 2.0, 3.0005], np.float32)}, 0.01, 0.02)  # close: agrees
    stats.observe(a, {"y": np.array([1.0, 2.0, 4.0], np.float32)}, 0.01, 0.03)  # off by 1: disagrees
    stats.observe(a, {"y": np.array([1.0, 2.0], np.float32)}, 0.01, 0.04)  # wrong shape: disagrees
    stats.observe(a, {}, 0.01, 0.05)  # missing output: disagrees
    stats.observe(a, {"y": np.array([1.0, np.nan, 3.0], np.float32)}, 0.01, 0.06)  # NaN: disagrees
    snap = stats.snapshot()
    assert snap["samples"] == 5 and snap["agreement"] == pytest.approx(1 / 5)
    assert snap["top1"] is None
    assert snap["mean_abs_diff"] == pytest.approx((0.0005 + 1.0) / 8, rel=1e-3)  # 3 + 3 + 2 finite elements
    assert snap["latency_ratio"] == pytest.approx(0.045 / 0.01)  # window of 4: median of .03 .04 .05 .06
    assert len(stats.shadow_s) == 4  # constant memory
