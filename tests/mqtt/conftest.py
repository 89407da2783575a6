"""Fixtures for MQTT tests: real mosquitto brokers on free loopback ports, certificates, a fleet-side
subscriber that records what the device publishes, and a fleet command key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgert.device.sync_config import MqttSettings
from tests.brokers import CA, DEVICE_ACL, Mosquitto

FLEET, DEVICE = "f1", "dev-a"
WAIT_S = 20.0

pytestmark = pytest.mark.integration


def require_mosquitto() -> None:
    """Skip unless mosquitto is installed; fail instead when CI=true or EDGERT_REQUIRE_BROKERS=1."""
    from tests.brokers import require_mosquitto as require

    require()


def wait_for(pred: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail the test with ``what`` on timeout (a bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Recorder:
    """A fleet-side paho client that records every message on a topic filter."""

    def __init__(
        self,
        port: int,
        topic: str = "edgert/#",
        *,
        username: str | None = None,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rec-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT_S), "recorder could not subscribe"

    def _on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)

    def on(self, suffix: str) -> list[paho.MQTTMessage]:
        with self.lock:
            return [m for m in self.messages if m.topic.endswith(suffix)]

    def json_on(self, suffix: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.on(suffix)]

    def publish(self, topic: str, payload: bytes, properties: Any = None) -> None:
        self.client.publish(topic, payload, qos=1, properties=properties).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def telemetry_seqs(*recorders: Recorder) -> list[tuple[int, bool]]:
    """(seq, replayed) of every telemetry message seen, in arrival order, across recorders."""
    out = []
    for rec in recorders:
        for doc in rec.json_on("/telemetry"):
            out.append((doc["seq"], bool(doc.get("replayed"))))
    return out


def assert_complete_in_order(seqs: list[tuple[int, bool]], upto: int) -> None:
    """Every seq 1..upto arrived; first arrivals are in increasing order (duplicates allowed: QoS 1)."""
    first: list[int] = []
    seen: set[int] = set()
    for seq, _ in seqs:
        if seq not in seen:
            seen.add(seq)
            first.append(seq)
    assert set(range(1, upto + 1)) <= seen, f"lost: {sorted(set(range(1, upto + 1)) - seen)[:20]}"
    assert first == sorted(first), "telemetry arrived out of order"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto."""
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    """A CA, a server cert, device certs for dev-a/dev-b/fleet, an expired one and a foreign CA."""
    d = tmp_path / "pki"
    d.mkdir()
    ca = CA.create(d)
    other = CA.create(d, "other-ca")
    out: dict[str, Any] = {"ca": ca, "other_ca": other, "server": ca.issue(d, "localhost", server=True)}
    for name in ("dev-a", "dev-b", "fleet"):
        out[name] = ca.issue(d, name)
    out["expired"] = ca.issue(d, "dev-x", expired=True)
    return out


@pytest.fixture
def mtls_broker(tmp_path: Path, pki: dict[str, Any]) -> Iterator[Mosquitto]:
    """mosquitto with TLS, require_certificate, use_identity_as_username and the device ACL."""
    require_mosquitto()
    server_cert, server_key = pki["server"]
    b = Mosquitto(
        tmp_path / "mtls",
        tls=(pki["ca"].path, server_cert, server_key),
        require_certificate=True,
        acl=DEVICE_ACL,
    ).start()
    yield b
    b.stop()


@pytest.fixture
def command_key(tmp_path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """The fleet command key pair; returns the private key and the pinned public key file."""
    key = Ed25519PrivateKey.generate()
    pub = tmp_path / "fleet-cmd.pub"
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key, pub


def make_config(tmp_path: Path, port: int, **overrides: Any) -> MqttSettings:
    """An [mqtt] config for DEVICE with fast reconnects and a private spool."""
    d: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "fleet": FLEET,
        "device_id": DEVICE,
        "telemetry_interval": 0.2,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        "keepalive": 5,
        "spool_path": str(tmp_path / "spool" / "telemetry.sqlite"),
    }
    d.update(overrides)
    return MqttSettings.from_dict(d, "test")
