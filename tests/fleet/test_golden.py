"""The fleet's golden input/output (signed in the TUF targets metadata) gate a device's health check."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.runtime import Runtime
from edgert.security.package import create_package
from tests.brokers import Mosquitto
from tests.fleet.test_transport_kit import fleet_broker  # noqa: F401 - fixture
from tests.fleet.test_updater_e2e import NOW, Rig
from tests.security.kit import MODELS, PUBLISHER, source

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def rig(tmp_path: Path, fleet_broker: Mosquitto) -> Iterator[Rig]:  # noqa: F811
    r = Rig(tmp_path, fleet_broker)
    try:
        yield r
    finally:
        r.close()


def _npz(arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _publish(rig: Rig, version: str, model: Path, golden_from: Path) -> None:
    x = np.load(MODELS / "digits_test.npz")["x"][:4].astype(np.float32)
    expected = Runtime("cpu-generic").load(golden_from).infer({"pixels": x})
    out = io.BytesIO()
    create_package([source(model)], out, name="digits", version=version,
                   recipients=[rig.device.keys.wrap_public], signer=PUBLISHER, now=NOW, chunk_size=4096)
    golden = {"inputs": _npz({"pixels": x}), "outputs": _npz(dict(expected))}
    rig.repo.add_target(f"models/digits/{version}.edgepkg", out.getvalue(),
                        custom={"edgert": {"name": "digits", "version": version, "golden": golden}})


def test_a_version_whose_outputs_differ_from_the_golden_ones_is_not_served(rig: Rig) -> None:
    # the package holds the large model, the golden outputs come from another build (the small one)
    _publish(rig, "2", MODELS / "digits_large_int8.onnx", golden_from=MODELS / "digits_small_int8.onnx")
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "failed"
    assert "differs from the package's golden output" in rig.device.events[-1]["reason"]
    assert rig.device.served() == ("1", "1")


def test_a_version_matching_its_golden_outputs_serves(rig: Rig) -> None:
    _publish(rig, "2", MODELS / "digits_large_int8.onnx", golden_from=MODELS / "digits_large_int8.onnx")
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "active"
    assert rig.device.served() == ("2", "2")
