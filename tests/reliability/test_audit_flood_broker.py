"""Issue 9 B.4 through a real mosquitto: unsigned commands flood the device's command topic.

The daemon's audit log gets a few records per reason, whose counts add up to every refusal the
device made (the broker may drop some of the flood on its way; those were never refused).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.device.compliance import open_daemon_audit
from edgert.device.sync import SyncService
from edgert.mqtt.signing import sign_command
from edgert.security.audit import read_records, verify_dir
from edgert.security.keys import init_keystore, load_keystore
from tests.brokers import Mosquitto
from tests.mqtt.conftest import DEVICE, FLEET, Recorder, make_config, require_mosquitto, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CMD = f"edgert/v1/{FLEET}/devices/{DEVICE}/cmd"
#: Messages sent (the review sent 18,380 in 10 s; a few thousand show the same on a shared CI box).
FLOOD = 3_000
GROWTH_LIMIT = 16 * 1024
REPLY_WAIT_S = 120.0
PING_ATTEMPTS = 20


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def test_an_unsigned_flood_through_the_broker_adds_a_few_records(tmp_path: Path, broker: Mosquitto) -> None:
    from cryptography.hazmat.primitives import serialization

    state = tmp_path / "state"
    init_keystore(state / "keys")
    fleet_key = Ed25519PrivateKey.generate()
    pub = tmp_path / "fleet-cmd.pub"
    pub.write_bytes(fleet_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    audit = open_daemon_audit(state)
    audit.event("daemon_start", pid=1)
    before = sum(p.stat().st_size for p in (state / "audit").iterdir())
    svc = SyncService(make_config(tmp_path, broker.port, command_key_file=str(pub), telemetry_interval=3600),
                      audit=audit.event)
    rec = Recorder(broker.port, f"edgert/v1/{FLEET}/devices/{DEVICE}/reply")
    svc.start()
    try:
        assert svc.link.wait_connected(10)
        for _ in range(FLOOD):
            rec.publish(CMD, b'{"v":1,"body":"{}"}')
        # One command worker handles messages in order: once the signed ping is answered, every
        # message the broker delivered before it has been handled (and audited).
        for attempt in range(PING_ATTEMPTS):  # the ping itself may find the queue full ("busy")
            rid = f"last-{attempt}"
            rec.publish(CMD, sign_command(fleet_key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time(),
                                          request_id=rid))
            wait_for(lambda: any(d.get("request_id") == rid for d in rec.json_on("/reply")),  # noqa: B023
                     timeout=REPLY_WAIT_S, what="the reply to the ping sent after the flood")
            if next(d for d in rec.json_on("/reply") if d.get("request_id") == rid)["ok"]:
                break
        else:
            pytest.fail(f"the device answered {PING_ATTEMPTS} pings 'busy'")
    finally:
        svc.stop()
        rec.close()
    audit.close()
    handled = svc.counters["commands"] - 1  # all but the ping were refused as unsigned
    assert handled > 0, svc.counters
    growth = sum(p.stat().st_size for p in (state / "audit").iterdir()) - before
    assert growth <= GROWTH_LIMIT, f"{handled} refusals grew the audit log by {growth} bytes"
    records = list(read_records(state / "audit"))
    refused = [r["data"] for r in records if r["event"] == "mqtt.command.refused"]
    assert {d["reason"] for d in refused} == {"unsigned"}
    assert sum(d["count"] for d in refused) == handled  # every refusal counted, none lost
    assert [r["data"]["cmd"] for r in records if r["event"] == "mqtt.command.accepted"] == ["ping"]
    assert verify_dir(state / "audit", load_keystore(state / "keys").sign_public).ok
