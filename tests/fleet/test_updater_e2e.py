"""The device updater end to end: real mosquitto, a real TUF repository made in the test, the controller's
RepoServer, a real encrypted store and a real Deployer and Engine serving on a loop thread."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.config import ModelEntry
from edgert.device.deployer import Deployer
from edgert.device.importing import import_plaintext
from edgert.device.repo_fetcher import MqttFetcher
from edgert.device.sources import ModelSource
from edgert.device.updater import DeviceUpdater, UpdaterPaths
from edgert.engine import Engine
from edgert.metrics import Metrics
from edgert.mqtt.repo_protocol import assignment_topic, sign_desired_state
from edgert.mqtt.topics import deployment_topic
from edgert.runtime import Runtime
from edgert.security import envelope
from edgert.security.keys import fingerprint
from edgert.security.loader import open_keystore, open_store
from edgert.security.package import create_package, format_key, read_header
from tests.brokers import Mosquitto
from tests.device.models_kit import fails_at_run
from tests.fleet.test_transport_kit import (
    DEVICE,
    FLEET,
    WAIT_S,
    Controller,
    DeviceLink,
    TufRepo,
    fleet_broker,  # noqa: F401 - fixture
    wait_for,
)
from tests.security.kit import MODELS, NOW, PUBLISHER, source

pytestmark = pytest.mark.integration
GROUP = "lab"
COMMAND_KEY = Ed25519PrivateKey.generate()


class Device:
    """One device: store with digits 1 serving, engine, Deployer on a loop thread, and the updater."""

    def __init__(self, tmp: Path, port: int, repo: TufRepo) -> None:
        self.tmp, self.port, self.repo = tmp, port, repo
        self.state = tmp / "state"
        self.keys = open_keystore(self.state, create=True)
        self.store = open_store(self.state, self.keys, extra_publishers=[format_key(PUBLISHER.public_key())])
        import_plaintext(self.store, MODELS / "digits_small_int8.onnx", name="digits", version="1")
        self.engine = Engine(Metrics())
        self.audit: list[tuple[str, dict[str, Any]]] = []
        self.deployer = Deployer(
            source=ModelSource(Runtime("cpu-generic"), lambda: self.store), target=self.engine,
            audit=lambda event, **fields: self.audit.append((event, fields)),
            models=lambda: (ModelEntry("digits"),))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.deployer.loop = self.loop
        self.deployer.run_threadsafe(self.deployer.boot([ModelEntry("digits")]))
        self.paths = UpdaterPaths(self.state)
        self.paths.tuf.mkdir(mode=0o700)
        self.paths.root_file.write_bytes(repo.root_bytes)  # provisioning
        self.events: list[dict[str, Any]] = []
        self.updater: DeviceUpdater | None = None
        self.link: DeviceLink | None = None
        self.start_updater()

    def start_updater(self) -> DeviceUpdater:
        """A fresh updater and link, as after a daemon restart (only the files carry over)."""
        self.stop_updater()
        holder: list[DeviceUpdater] = []
        topics = (deployment_topic(FLEET, GROUP), assignment_topic(FLEET, DEVICE))
        self.link = DeviceLink(self.port, timeout_s=2.0, attempts=3,
                               extra=lambda t, p: holder[0].handle_message(t, p) if holder else None)
        link = self.link
        self.updater = DeviceUpdater(
            fleet=FLEET, device=DEVICE, groups=[GROUP], command_key=COMMAND_KEY.public_key(),
            paths=self.paths,
            fetcher_factory=lambda partial: MqttFetcher(link.requester, partial_dir=partial),
            store=self.store, deployer=self.deployer, emit=self.events.append,
            repo_replies=link.requester.handle_reply, retry_s=(0.2, 1.0))
        holder.append(self.updater)
        for topic in topics:  # subscribe after the updater exists: retained documents arrive at once
            link.link.subscribe(topic, qos=1)
        link.topics = (*link.topics, *topics)
        self.updater.start()
        return self.updater

    def stop_updater(self) -> None:
        if self.updater is not None:
            self.updater.stop()
        if self.link is not None:
            self.link.close()

    def served(self) -> tuple[str | None, str]:
        """(store active, engine serving)."""
        return self.store.entry("digits").active, self.engine.served_version("digits")

    def states(self, seq: int) -> list[str]:
        return [e["state"] for e in self.events if e["seq"] == seq]

    def wait_final(self, seq: int) -> str:
        wait_for(lambda: any(s in ("active", "failed", "rolled-back") for s in self.states(seq)),
                 what=f"the update of seq {seq} to end")
        return self.states(seq)[-1]

    def close(self) -> None:
        self.stop_updater()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.close()
        self.loop.close()


class Rig:
    """Broker, TUF repository, controller and one device."""

    def __init__(self, tmp: Path, broker: Mosquitto) -> None:
        self.repo = TufRepo(tmp / "repo")
        self.escrow = x25519.X25519PrivateKey.generate()
        self.records: dict[tuple[str, str], bytes] = {}
        self.ctl = Controller(broker.port, self.repo.dir,
                              key_records=lambda dev, path: self.records.get((dev, path)))
        self.device = Device(tmp, broker.port, self.repo)

    def add_package(self, version: str, model: Path, *, for_device: bool = True) -> bytes:
        keys: list[Any] = [self.device.keys] if for_device else []
        out = io.BytesIO()
        create_package([source(model)], out, name="digits", version=version,
                       recipients=[k.wrap_public for k in keys] + [self.escrow.public_key()],
                       signer=PUBLISHER, now=NOW, chunk_size=4096)
        data = out.getvalue()
        self.repo.add_target(f"models/digits/{version}.edgepkg", data,
                             custom={"edgert": {"name": "digits", "version": version}})
        return data

    def deploy(self, seq: int, version: str, *, key: Ed25519PrivateKey = COMMAND_KEY,
               topic: str | None = None) -> dict[str, Any]:
        doc = sign_desired_state({"v": 1, "fleet": FLEET, "seq": seq, "rollout": f"r{seq}", "model": "digits",
                                  "version": version, "target": f"models/digits/{version}.edgepkg",
                                  "shadow": None, "issued": int(time.time())}, key)
        self.ctl.client.publish(topic or deployment_topic(FLEET, GROUP), json.dumps(doc).encode(), qos=1,
                                retain=True).wait_for_publish(WAIT_S)
        return doc

    def close(self) -> None:
        self.device.close()
        self.ctl.close()


@pytest.fixture
def rig(tmp_path: Path, fleet_broker: Mosquitto) -> Iterator[Rig]:  # noqa: F811
    r = Rig(tmp_path, fleet_broker)
    try:
        yield r
    finally:
        r.close()


def test_a_deployment_makes_the_device_serve_the_new_version(rig: Rig) -> None:
    assert rig.device.served() == ("1", "1")
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "active"
    assert rig.device.states(1) == ["downloading", "verifying", "installing", "healthy", "active"]
    assert rig.device.served() == ("2", "2")
    assert rig.device.updater is not None and rig.device.updater.applied_seq == 1
    deployed = [f for e, f in rig.device.audit if e == "model_deployed" and f["version"] == "2"]
    assert deployed and deployed[0]["origin"] == "updater"
    assert not list(rig.device.paths.downloads.glob("*.edgepkg")), "the ciphertext download is cleaned up"


def test_forged_and_replayed_documents_are_ignored(rig: Rig) -> None:
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    rig.add_package("3", MODELS / "digits_small_fp32.onnx")
    rig.deploy(5, "2")
    assert rig.device.wait_final(5) == "active"
    up = rig.device.updater
    assert up is not None
    rig.deploy(9, "3", key=Ed25519PrivateKey.generate())  # forged: not the fleet's key
    wait_for(lambda: up.counters["rejected"] >= 1, what="the forged document to be refused")
    rig.deploy(4, "3", topic=assignment_topic(FLEET, DEVICE))  # genuine but older: a replay
    wait_for(lambda: up.counters["ignored"] >= 1, what="the replayed document to be ignored")
    assert up.job is None and rig.device.served() == ("2", "2")
    # After a restart the retained documents (forged seq 9 on the group, replayed seq 4 on the
    # assignment) arrive again; seq 4 is still ignored because the applied seq was persisted.
    up2 = rig.device.start_updater()
    wait_for(lambda: up2.counters["rejected"] == 1 and up2.counters["ignored"] == 1,
             what="the retained documents")
    assert up2.applied_seq == 5 and up2.job is None and up2.counters["accepted"] == 0
    assert rig.device.served() == ("2", "2")
    assert not [e for e in rig.device.events if e["version"] == "3"]


def test_a_package_failing_its_health_check_ends_failed_and_the_old_version_serves(rig: Rig) -> None:
    rig.add_package("2", fails_at_run(rig.device.tmp / "broken.onnx"))
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "failed"
    (failed,) = [e for e in rig.device.events if e["state"] == "failed"]
    assert "warm-up of model 'digits' version '2' failed" in failed["reason"]
    assert rig.device.served() == ("1", "1")
    assert rig.device.updater is not None and rig.device.updater.applied_seq == 1  # not retried forever


def test_a_tampered_target_never_reaches_the_store(rig: Rig) -> None:
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    served = next((rig.repo.dir / "targets" / "models" / "digits").glob("*.2.edgepkg"))
    data = bytearray(served.read_bytes())
    data[-100] ^= 0x01
    served.write_bytes(bytes(data))
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "failed"
    assert rig.device.states(1) == ["downloading", "failed"]
    assert "LengthOrHashMismatchError" in rig.device.events[-1]["reason"]
    assert rig.device.store.entry("digits").installed == ["1"]
    assert rig.device.served() == ("1", "1")


def test_a_package_without_this_device_gets_its_wrapped_key_on_demand(rig: Rig) -> None:
    data = rig.add_package("2", MODELS / "digits_large_int8.onnx", for_device=False)
    header = read_header(io.BytesIO(data))
    key = header.key_for(rig.escrow)  # what the controller does with the escrow key
    record = envelope.wrap_key(key, rig.device.keys.wrap_public, header.manifest.binding)
    assert record["recipient"] == fingerprint(rig.device.keys.wrap_public)
    rig.records[(DEVICE, "models/digits/2.edgepkg")] = json.dumps({  # edgert.fleet.keyrecords' document
        "v": 1, "target": "models/digits/2.edgepkg", "device": DEVICE, "model": "digits", "version": "2",
        "manifest_sha256": header.manifest.digest, "record": record}).encode()
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "active"
    assert rig.device.served() == ("2", "2")


def test_a_fleet_rollback_to_a_lower_version_is_rolled_back(rig: Rig) -> None:
    rig.add_package("2", MODELS / "digits_large_int8.onnx")
    rig.add_package("3", MODELS / "digits_small_fp32.onnx")
    rig.deploy(1, "2")
    assert rig.device.wait_final(1) == "active"
    rig.deploy(2, "3")
    assert rig.device.wait_final(2) == "active"
    assert rig.device.served() == ("3", "3")
    rig.deploy(3, "2")  # the fleet's signed rollback: a higher seq naming a lower version
    assert rig.device.wait_final(3) == "rolled-back"
    assert rig.device.served() == ("2", "2")


def test_an_update_interrupted_mid_download_resumes_after_a_restart(rig: Rig) -> None:
    data = rig.add_package("2", MODELS / "digits_large_int8.onnx")
    served: list[int] = []
    real = rig.ctl.server.answer
    cut = len(data) // 2
    answering = threading.Event()
    answering.set()

    def answer(device: str, payload: bytes):  # the controller goes silent past half of the package
        reply = real(device, payload)
        if reply is not None and reply.total == len(data) and reply.status == "ok":
            if reply.offset >= cut and not answering.is_set():
                return None
            served.append(len(reply.data))
        return reply

    answering.clear()
    rig.ctl.server.answer = answer  # type: ignore[method-assign]
    assert rig.device.link is not None
    rig.device.link.requester.timeout_s = 0.3
    rig.deploy(1, "2")
    up = rig.device.updater
    assert up is not None
    wait_for(lambda: bool(up.job and up.job.get("error")), what="the download to stall")
    rig.device.stop_updater()  # the daemon dies here; only its files survive
    (part,) = rig.device.paths.partial.glob("*.part")
    have = part.stat().st_size
    assert 0 < have and sum(served) == have
    assert json.loads(rig.device.paths.state_file.read_text())["job"]["doc"]["seq"] == 1
    served.clear()
    answering.set()
    rig.device.start_updater()
    assert rig.device.wait_final(1) == "active"
    assert rig.device.served() == ("2", "2")
    assert sum(served) == len(data) - have, "the download resumed from its partial file"
