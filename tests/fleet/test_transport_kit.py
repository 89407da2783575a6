"""Shared parts of the fleet transport and updater tests: a real TUF repository made with python-tuf's
own API, a controller answering the repo topics on a real mosquitto, and a device-side link.

(Named test_transport_*.py so it lives beside the tests; its one test checks the repository it builds.)
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgert.device.repo_fetcher import MqttFetcher, RepoRequester
from edgert.device.sync_config import MqttSettings
from edgert.mqtt.client import MqttLink
from edgert.mqtt.repo_protocol import reply_topic
from edgert.mqtt.repo_server import KeyRecords, RepoServer
from edgert.security.keys import DeviceKeys
from edgert.security.package import create_package
from tests.brokers import Mosquitto
from tests.mqtt.conftest import require_mosquitto
from tests.security.kit import NOW, PUBLISHER, source

FLEET, DEVICE = "f1", "dev-a"
WAIT_S = 30.0
ROLES = ("root", "targets", "snapshot", "timestamp")


def wait_for(pred: Callable[[], bool], timeout: float = WAIT_S, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail with ``what`` on timeout (a bound, not a speed check)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class TufRepo:
    """A static TUF repository (consistent snapshots) in ``directory``, signed with fresh ed25519 keys."""

    def __init__(self, directory: Path, *, expires: timedelta = timedelta(days=7)) -> None:
        self.dir = directory
        (directory / "metadata").mkdir(parents=True)
        (directory / "targets").mkdir()
        self.signers = {role: CryptoSigner.generate_ed25519() for role in ROLES}
        exp = datetime.now(timezone.utc).replace(microsecond=0) + expires
        root = Root(expires=exp, consistent_snapshot=True)
        for role in ROLES:
            root.add_key(self.signers[role].public_key, role)
        self.md: dict[str, Metadata[Any]] = {
            "root": Metadata(root), "targets": Metadata(Targets(expires=exp)),
            "snapshot": Metadata(Snapshot(expires=exp)), "timestamp": Metadata(Timestamp(expires=exp))}
        for role in ROLES:
            self._write(role)

    def _write(self, role: str) -> None:
        md = self.md[role]
        md.signatures.clear()
        md.sign(self.signers[role], append=True)
        data = md.to_bytes(JSONSerializer(compact=False))
        name = "timestamp.json" if role == "timestamp" else f"{md.signed.version}.{role}.json"
        (self.dir / "metadata" / name).write_bytes(data)

    @property
    def root_bytes(self) -> bytes:
        """The trusted root a device is provisioned with (1.root.json)."""
        return (self.dir / "metadata" / "1.root.json").read_bytes()

    def add_target(self, path: str, data: bytes, custom: dict[str, Any] | None = None) -> Path:
        """Add ``data`` as target ``path`` and re-sign targets, snapshot and timestamp; return the file."""
        tf = TargetFile.from_data(path, data, ["sha256"])
        if custom is not None:
            tf.unrecognized_fields["custom"] = custom
        self.md["targets"].signed.targets[path] = tf
        dirname, _, base = path.rpartition("/")
        out = self.dir / "targets" / dirname / f"{tf.hashes['sha256']}.{base}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        self.publish()
        return out

    def publish(self) -> None:
        """Bump and re-sign targets, snapshot and timestamp."""
        targets, snapshot, timestamp = (self.md[r].signed for r in ("targets", "snapshot", "timestamp"))
        targets.version += 1
        self._write("targets")
        snapshot.version += 1
        snapshot.meta["targets.json"] = MetaFile(targets.version)
        self._write("snapshot")
        timestamp.version += 1
        timestamp.snapshot_meta = MetaFile(snapshot.version)
        self._write("timestamp")


def package_bytes(keys: list[DeviceKeys], model: Path, *, name: str = "digits", version: str = "2",
                  chunk_size: int = 4096) -> bytes:
    """A real signed, encrypted .edgepkg of ``model`` for ``keys`` (the test fleet's publisher)."""
    out = io.BytesIO()
    create_package([source(model)], out, name=name, version=version,
                   recipients=[k.wrap_public for k in keys], signer=PUBLISHER, now=NOW, chunk_size=chunk_size)
    return out.getvalue()


class Controller:
    """A fleet-side paho client running :class:`RepoServer` (re-subscribes after every reconnect)."""

    def __init__(self, port: int, root: Path, *, key_records: KeyRecords | None = None,
                 drop: Callable[[str, bytes], bool] = lambda topic, payload: False) -> None:
        self.drop = drop
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"ctl-{time.monotonic_ns()}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.reconnect_delay_set(0.05, 0.5)
        self.server = RepoServer(root, FLEET, self._publish, key_records=key_records)
        self.subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.server.attach_paho(c)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.connect("127.0.0.1", port, 5)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT_S), "controller could not subscribe"

    def _publish(self, topic: str, payload: bytes) -> None:
        if not self.drop(topic, payload):
            self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DeviceLink:
    """The device's MqttLink, subscribed to its repo reply topic, feeding a RepoRequester."""

    def __init__(self, port: int, *, timeout_s: float = 5.0, attempts: int = 4,
                 extra: Callable[[str, bytes], None] | None = None, topics: tuple[str, ...] = ()) -> None:
        cfg = MqttSettings.from_dict({"host": "127.0.0.1", "port": port, "fleet": FLEET, "device_id": DEVICE,
                                      "reconnect_min": 0.05, "reconnect_max": 0.5, "keepalive": 5}, "test")
        self.extra = extra
        self.topics = (reply_topic(FLEET, DEVICE), *topics)
        self.link = MqttLink(cfg.broker, on_connect=self._on_connect, on_message=self._on_message)
        self.requester = RepoRequester(lambda t, p: self.link.publish(t, p, qos=1), fleet=FLEET,
                                       device=DEVICE, timeout_s=timeout_s, attempts=attempts,
                                       retry_pause_s=0.05)
        self.link.start()
        assert self.link.wait_connected(WAIT_S), "device could not connect"

    def _on_connect(self, session_present: bool) -> None:
        for topic in self.topics:
            self.link.subscribe(topic, qos=1)

    def _on_message(self, topic: str, payload: bytes, props: Any) -> None:
        if topic == self.requester.reply_topic:
            self.requester.handle_reply(payload)
        elif self.extra is not None:
            self.extra(topic, payload)

    def fetcher(self, partial_dir: Path | None = None, **kwargs: Any) -> MqttFetcher:
        """An MqttFetcher over this link."""
        return MqttFetcher(self.requester, partial_dir=partial_dir, **kwargs)

    def close(self) -> None:
        self.link.stop()


@pytest.fixture
def fleet_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto on a free port (restartable on the same port)."""
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def test_repository_is_consistent_snapshot_layout(tmp_path: Path) -> None:
    repo = TufRepo(tmp_path / "repo")
    data = b"x" * 100
    out = repo.add_target("models/digits/2.edgepkg", data)
    assert out.name == f"{hashlib.sha256(data).hexdigest()}.2.edgepkg"
    names = sorted(p.name for p in (tmp_path / "repo" / "metadata").iterdir())
    assert names == ["1.root.json", "1.snapshot.json", "1.targets.json", "2.snapshot.json",
                     "2.targets.json", "timestamp.json"]
