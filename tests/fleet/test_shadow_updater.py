"""The updater's shadow phase end to end on one device: real mosquitto, TUF repository, encrypted store,
Deployer, Engine and ServingAdapter. A shadow document installs the version and runs it as a candidate;
live requests are answered by the serving version and produce ``shadow`` reports; the promotion deploys
it without a second download."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgert.device.serving import ServingAdapter
from edgert.mqtt.repo_protocol import sign_desired_state
from edgert.mqtt.topics import deployment_topic
from edgert.runtime import Runtime
from tests.brokers import Mosquitto
from tests.fleet.test_transport_kit import FLEET, WAIT_S, fleet_broker, wait_for  # noqa: F401 - fixture
from tests.fleet.test_updater_e2e import COMMAND_KEY, GROUP, Rig
from tests.security.kit import MODELS

pytestmark = pytest.mark.integration


@pytest.fixture
def rig(tmp_path: Path, fleet_broker: Mosquitto) -> Iterator[Rig]:  # noqa: F811
    r = Rig(tmp_path, fleet_broker)
    assert r.device.updater is not None
    r.device.updater.shadow.report_s = 0.2  # report often so the test does not wait
    try:
        yield r
    finally:
        for name in list(r.device.deployer.shadows):
            r.device.deployer.run_threadsafe(r.device.deployer.stop_shadow(name))
        r.close()


def _publish(rig: Rig, seq: int, version: str, shadow: float | None) -> None:
    doc = sign_desired_state({"v": 1, "fleet": FLEET, "seq": seq, "rollout": "r-shadow", "model": "digits",
                              "version": version, "target": f"models/digits/{version}.edgepkg",
                              "shadow": None if shadow is None else {"percent": shadow},
                              "issued": int(time.time())}, COMMAND_KEY)
    rig.ctl.client.publish(deployment_topic(FLEET, GROUP), json.dumps(doc).encode(), qos=1,
                           retain=True).wait_for_publish(WAIT_S)


def _shadow_events(rig: Rig) -> list[dict[str, Any]]:
    return [e for e in rig.device.events if e["event"] == "shadow"]


def test_shadow_then_promotion(rig: Rig) -> None:
    dev = rig.device
    downloads: list[int] = []
    real = rig.ctl.server.answer

    def answer(device: str, payload: bytes) -> Any:  # count package bytes the controller sends
        reply = real(device, payload)
        if reply is not None and reply.status == "ok" and b"edgepkg" in payload:
            downloads.append(len(reply.data))
        return reply

    rig.ctl.server.answer = answer  # type: ignore[method-assign]
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    _publish(rig, 1, "2", 50.0)
    wait_for(lambda: dev.states(1)[-1:] == ["healthy"] and "digits" in dev.deployer.shadows,
             what="the shadow candidate to start")
    assert dev.states(1) == ["downloading", "verifying", "installing", "healthy"]
    assert [e.get("shadow") for e in dev.events if e.get("seq") == 1][-1] is True
    assert dev.served() == ("1", "1"), "the candidate is installed, neither active nor serving"
    assert dev.store.entry("digits").installed == ["1", "2"]
    package_bytes = sum(downloads)
    assert package_bytes > 0

    adapter = ServingAdapter(SimpleNamespace(  # type: ignore[arg-type]
        engine=dev.engine, deployer=dev.deployer, capture=None, shadows=dev.deployer.shadows))
    x = np.load(MODELS / "digits_test.npz")["x"]
    runner = dev.deployer.shadows["digits"]
    served = []
    for i in range(200):
        result = dev.deployer.run_threadsafe(adapter.infer("digits", {"pixels": x[i:i + 1]}))
        assert result.model_version == "1"
        served.append(result.outputs["logits"])
        assert runner.wait_idle(WAIT_S)
    small = Runtime("cpu-generic").load(MODELS / "digits_small_int8.onnx")
    want = np.concatenate([small.run({"pixels": x[i:i + 1]})["logits"] for i in range(200)])
    np.testing.assert_array_equal(np.concatenate(served), want)  # exactly version 1's outputs
    wait_for(lambda: any(e["samples"] == 100 for e in _shadow_events(rig)), what="a report of 100 samples")
    report = next(e for e in _shadow_events(rig) if e["samples"] == 100)
    assert (report["rollout"], report["model"], report["version"], report["seq"]) == \
        ("r-shadow", "digits", "2", 1)
    assert 0.8 < report["agreement"] < 1.0 and report["latency_ratio"] > 0 and report["errors"] == 0
    assert dev.served() == ("1", "1")
    persisted = json.loads(dev.paths.state_file.read_text())
    assert list(persisted["shadows"]) == ["digits"] and persisted["applied_seq"] == 1

    # A restart: only the files survive; the shadow comes back.
    dev.deployer.run_threadsafe(dev.deployer.stop_shadow("digits", origin="test-crash"))
    up = dev.start_updater()
    up.shadow.report_s = 0.2
    wait_for(lambda: "digits" in dev.deployer.shadows, what="the shadow to resume after a restart")

    _publish(rig, 2, "2", None)  # the controller's promotion
    assert dev.wait_final(2) == "active"
    assert dev.states(2) == ["healthy", "active"], "the installed version is deployed without a download"
    assert sum(downloads) == package_bytes
    assert dev.served() == ("2", "2") and dev.deployer.shadows == {}
    assert json.loads(dev.paths.state_file.read_text())["shadows"] == {}


def test_a_document_for_another_version_stops_the_shadow(rig: Rig) -> None:
    dev = rig.device
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    rig.add_package("3", MODELS / "digits_small_fp32.onnx")
    _publish(rig, 1, "2", 100.0)
    wait_for(lambda: "digits" in dev.deployer.shadows, what="the shadow candidate to start")
    _publish(rig, 2, "3", None)
    assert dev.wait_final(2) == "active"
    assert dev.served() == ("3", "3") and dev.deployer.shadows == {}
    assert dev.store.entry("digits").active == "3"


def test_a_shadow_candidate_failing_its_health_check_is_reported_failed(rig: Rig) -> None:
    from tests.device.models_kit import fails_at_run

    dev = rig.device
    rig.add_package("2", fails_at_run(dev.tmp / "broken.onnx"))
    _publish(rig, 1, "2", 50.0)
    assert dev.wait_final(1) == "failed"
    assert "warm-up of model 'digits' version '2' failed" in dev.events[-1]["reason"]
    assert dev.served() == ("1", "1") and dev.deployer.shadows == {}
