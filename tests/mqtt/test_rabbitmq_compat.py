"""MQTT 3.1.1 compatibility: the sync service against RabbitMQ's MQTT plugin (no MQTT 5 there)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgert.device.sync import SyncService
from edgert.mqtt.probe import probe
from tests.brokers import RabbitMQ, rabbitmq_available
from tests.mqtt.conftest import make_config, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitMQ]:
    if not rabbitmq_available():
        pytest.skip("rabbitmq-server is not installed; run tools/install_test_brokers.sh")
    node = RabbitMQ(tmp_path_factory.mktemp("rabbit")).start()
    yield node
    node.stop()


def test_sync_over_mqtt311_on_rabbitmq(tmp_path: Path, rabbit: RabbitMQ) -> None:
    got: list[dict[str, object]] = []
    sub = paho.Client(
        CallbackAPIVersion.VERSION2, client_id="fleet-sub", protocol=MQTTProtocolVersion.MQTTv311
    )
    sub.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    sub.connect("127.0.0.1", rabbit.mqtt_port, 30)
    sub.subscribe("edgert/v1/f1/devices/dev-a/telemetry", qos=1)
    sub.loop_start()
    cfg = make_config(
        tmp_path,
        rabbit.mqtt_port,
        protocol="3.1.1",
        username="guest",
        password_file=_pw(tmp_path),
        telemetry_interval=0.1,
    )
    checks = {c.name: c for c in probe(cfg.broker, cfg.sync.fleet, cfg.sync.device_id)}
    assert checks["connect"].ok and checks["publish"].ok and checks["subscribe"].ok
    assert checks["acl"].ok is None  # 3.1.1 cannot report denied publishes
    svc = SyncService(cfg)
    svc.start()
    try:
        wait_for(lambda: len(got) >= 5, timeout=30, what="telemetry via RabbitMQ")
    finally:
        svc.stop()
        sub.disconnect()
        sub.loop_stop()
    seqs = [d["seq"] for d in got]
    assert seqs == sorted(seqs) and seqs[0] == 1


def _pw(tmp_path: Path) -> str:
    p = tmp_path / "guest.pass"
    p.write_text("guest")
    p.chmod(0o600)
    return str(p)
