"""Deployer.start_shadow/stop_shadow with the real Engine, store and ServingAdapter: a candidate never serves
a caller and is never committed; live requests through the adapter feed it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgert.device.serving import ServingAdapter
from edgert.errors import BackendError, RollbackError
from edgert.runtime import Runtime
from tests.device.models_kit import MODELS
from tests.device.test_handlers import Rig

WAIT_S = 60.0


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)  # digits 1 (small int8), 2 (large int8, active), 3 (small fp32), 4 (broken)
    try:
        yield r
    finally:
        for name in list(r.deployer.shadows):
            r.deployer.run_threadsafe(r.deployer.stop_shadow(name))
        r.close()


def _adapter(rig: Rig) -> ServingAdapter:
    # The adapter reads these four daemon attributes; everything behind them is real.
    return ServingAdapter(SimpleNamespace(engine=rig.engine, deployer=rig.deployer, capture=None,  # type: ignore[arg-type]
                                          shadows=rig.deployer.shadows))


def test_live_requests_feed_the_shadow_and_callers_get_the_serving_version(rig: Rig) -> None:
    runner = rig.deployer.run_threadsafe(rig.deployer.start_shadow("digits", "3", 50.0, rollout="r7"))
    assert rig.state() == ("2", "2"), "a shadow is neither committed nor served"
    assert rig.deployer.shadows["digits"] is runner
    adapter = _adapter(rig)
    x = np.load(MODELS / "digits_test.npz")["x"][:120]
    served = []
    for i in range(len(x)):
        result = rig.deployer.run_threadsafe(adapter.infer("digits", {"pixels": x[i:i + 1]}))
        assert result.model_version == "2"
        served.append(result.outputs["logits"])
        assert runner.wait_idle(WAIT_S)  # one at a time, so no sample is skipped for a full queue
    large = Runtime("cpu-generic").load(MODELS / "digits_large_int8.onnx")
    want = np.concatenate([large.run({"pixels": x[i:i + 1]})["logits"] for i in range(len(x))])
    np.testing.assert_array_equal(np.concatenate(served), want)  # exactly the serving version's outputs
    snap = runner.snapshot()
    assert (snap["offered"], snap["sampled"], snap["samples"], snap["skipped"]) == (120, 60, 60, 0)
    small = Runtime("cpu-generic").load(MODELS / "digits_small_fp32.onnx")  # version 3
    sampled = range(1, len(x), 2)  # 50 %: every second request, deterministically
    truth = np.mean([small.run({"pixels": x[i:i + 1]})["logits"].argmax() == want[i].argmax()
                     for i in sampled])
    assert snap["agreement"] == pytest.approx(float(truth)) and 0.8 < snap["agreement"] < 1.0
    assert snap["latency_ratio"] is not None and snap["latency_ratio"] > 0
    final = rig.deployer.run_threadsafe(rig.deployer.stop_shadow("digits"))
    assert final is not None and final["samples"] == 60 and "digits" not in rig.deployer.shadows
    assert rig.state() == ("2", "2")
    events = [e for e, _ in rig.audit]
    assert "model_shadow_started" in events and "model_shadow_stopped" in events
    assert rig.deployer.run_threadsafe(rig.deployer.stop_shadow("digits")) is None


def test_a_candidate_below_the_anti_rollback_floor_is_refused_first(rig: Rig) -> None:
    with pytest.raises(RollbackError):
        rig.deployer.run_threadsafe(rig.deployer.start_shadow("digits", "1", 100.0))
    assert rig.deployer.shadows == {} and rig.state() == ("2", "2")
    runner = rig.deployer.run_threadsafe(
        rig.deployer.start_shadow("digits", "1", 100.0, allow_downgrade=True))
    assert runner.version == "1" and rig.state() == ("2", "2")


def test_a_candidate_failing_its_health_check_never_runs(rig: Rig) -> None:
    with pytest.raises(BackendError, match="warm-up of model 'digits' version '4' failed"):
        rig.deployer.run_threadsafe(rig.deployer.start_shadow("digits", "4", 100.0))
    assert rig.deployer.shadows == {} and rig.state() == ("2", "2")
    (failed,) = [f for e, f in rig.audit if e == "model_deploy_failed"]
    assert (failed["stage"], failed["reason"], failed["version"]) == ("health", "shadow", "4")


def test_a_new_shadow_replaces_the_old_one(rig: Rig) -> None:
    first = rig.deployer.run_threadsafe(rig.deployer.start_shadow("digits", "3", 10.0))
    second = rig.deployer.run_threadsafe(rig.deployer.start_shadow("digits", "3", 10.0))
    assert first.model is not second.model
    assert rig.deployer.shadows == {"digits": second} and first is not second
    assert first.offer({"pixels": np.zeros((1, 64), np.float32)}, {}, 0.0) is False  # closed: takes nothing
    assert rig.state() == ("2", "2")
