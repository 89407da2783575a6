"""The rollout controller against a real mosquitto, with simulated devices written here as small paho
clients that behave like the device updater of FLEET_CONTRACT: they follow their signed assignment,
publish update events and a retained status with the model versions they serve."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgert.fleet import docs_sign
from edgert.fleet.controller import (
    ControllerService,
    ControllerSettings,
    create_rollout,
    request_rollback,
    set_paused,
)
from edgert.fleet.db import FleetDB, open_db
from edgert.mqtt.config import BrokerConfig
from tests.brokers import Mosquitto
from tests.mqtt.conftest import Recorder, require_mosquitto, wait_for

pytestmark = pytest.mark.integration
FLEET, GROUP, MODEL = "f1", "cams", "digits"
WAIT_S = 60.0


@dataclass
class SimDevice:
    """A device: on each (verified) assignment it reports downloading → … → active, or fails."""

    name: str
    port: int
    pub: Ed25519PublicKey
    version: str = "1"
    behaviour: Callable[[dict[str, Any]], str] = lambda doc: "ok"  # "ok" | "fail" | "ignore"
    shadow: tuple[float, float] | None = None  # (agreement, latency ratio) reported when shadowing
    got: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    active_at: float | None = None
    seq: int = 0  # highest seq followed (the contract: follow the highest among group and assignment)
    client: paho.Client | None = None

    def topic(self, ch: str) -> str:
        return f"edgert/v1/{FLEET}/devices/{self.name}/{ch}"

    def start(self) -> SimDevice:
        c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"sim-{self.name}", protocol=MQTTProtocolVersion.MQTTv5
        )
        c.will_set(
            self.topic("status"),
            json.dumps({"v": 1, "state": "offline", "device": self.name}),
            qos=1,
            retain=True,
        )
        ready = threading.Event()

        def on_connect(cl: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            cl.subscribe(self.topic("assignment"), qos=1)
            cl.subscribe(f"edgert/v1/{FLEET}/groups/{GROUP}/deployment", qos=1)
            self.status()
            ready.set()

        c.on_connect = on_connect
        c.on_message = self.on_message
        self.client = c
        c.connect("127.0.0.1", self.port, 30)
        c.loop_start()
        assert ready.wait(WAIT_S)
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None

    def status(self) -> None:
        assert self.client is not None
        self.client.publish(
            self.topic("status"),
            json.dumps(
                {
                    "v": 1,
                    "state": "online",
                    "device": self.name,
                    "ts": time.time(),
                    "models": {MODEL: self.version},
                }
            ),
            qos=1,
            retain=True,
        )

    def event(self, doc: dict[str, Any], state: str, **kw: Any) -> None:
        assert self.client is not None
        body = {
            "event": "update",
            "rollout": doc["rollout"],
            "model": doc["model"],
            "version": doc["version"],
            "state": state,
            **kw,
        }
        self.client.publish(self.topic("events"), json.dumps(body), qos=1)

    def on_message(self, client: Any, userdata: Any, msg: paho.MQTTMessage) -> None:
        if not msg.payload:
            return  # assignment cleared
        doc = docs_sign.verify_document(bytes(msg.payload), self.pub)  # a real device refuses unsigned docs
        if doc["seq"] <= self.seq:
            return
        self.seq = doc["seq"]
        if doc["version"] == self.version and doc["shadow"] is None:
            return  # already there
        self.got.append((time.monotonic(), doc))
        what = self.behaviour(doc)
        if what == "ignore":
            return
        if doc["shadow"] is not None:
            agreement, ratio = self.shadow or (1.0, 1.0)
            assert self.client is not None
            self.client.publish(
                self.topic("events"),
                json.dumps(
                    {
                        "event": "shadow",
                        "rollout": doc["rollout"],
                        "model": MODEL,
                        "version": doc["version"],
                        "agreement": agreement,
                        "latency_ratio": ratio,
                        "samples": 200,
                    }
                ),
                qos=1,
            )
            return
        for s in ("downloading", "verifying", "installing"):
            self.event(doc, s, **({"progress": "1/1"} if s == "downloading" else {}))
        if what == "fail":
            self.event(doc, "failed", reason="health check: golden output mismatch")
            self.event(doc, "rolled-back")
            return
        self.event(doc, "healthy")
        self.version = doc["version"]
        self.status()
        self.active_at = time.monotonic()
        self.event(doc, "active")
        assert self.client is not None
        self.client.publish(
            self.topic("telemetry"),
            json.dumps(
                {
                    "v": 1,
                    "device": self.name,
                    "seq": 1,
                    "models": {MODEL: {"version": self.version, "latency_s": {"p99": 4e-05}}},
                }
            ),
            qos=1,
        )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


class Fleet:
    """The db, a running controller and simulated devices; everything stopped at the end."""

    def __init__(self, tmp: Path, broker: Mosquitto, key: Ed25519PrivateKey, n: int, **sim: Any) -> None:
        self.broker, self.key = broker, key
        self.db_path = tmp / "fleet.sqlite"
        self.db = open_db(self.db_path)
        self.names = [f"dev-{i:02d}" for i in range(n)]
        for d in self.names:
            self.db.register_device(FLEET, d, [GROUP])
        self.devices = {d: SimDevice(d, broker.port, key.public_key(), **sim) for d in self.names}
        self.services: list[tuple[ControllerService, threading.Thread, FleetDB]] = []

    def start_devices(self, names: list[str] | None = None) -> None:
        for d in names or self.names:
            self.devices[d].start()

    def controller(self, cid: str = "ctl-a", ttl: float = 15.0) -> ControllerService:
        db = open_db(self.db_path)
        broker = BrokerConfig(
            host="127.0.0.1",
            port=self.broker.port,
            client_id=f"fleet-{cid}",
            reconnect_min=0.05,
            reconnect_max=0.5,
        )
        svc = ControllerService(
            ControllerSettings(FLEET, controller_id=cid, lease_ttl_s=ttl, tick_s=0.05), db, self.key, broker
        )
        svc.start()
        assert svc.link.wait_connected(WAIT_S)
        t = threading.Thread(target=svc.run, daemon=True)
        t.start()
        self.services.append((svc, t, db))
        return svc

    def state(self, rid: str) -> str:
        r = self.db.rollout(rid)
        assert r is not None
        return r.state

    def close(self) -> None:
        for svc, t, db in self.services:
            if not svc._stop.is_set():
                svc.stop()
            t.join(10)
            db.close()
        for dev in self.devices.values():
            dev.stop()
        self.db.close()


@pytest.fixture
def fleet_factory(
    tmp_path: Path, broker: Mosquitto, key: Ed25519PrivateKey
) -> Iterator[Callable[..., Fleet]]:
    made: list[Fleet] = []

    def make(n: int, **sim: Any) -> Fleet:
        f = Fleet(tmp_path, broker, key, n, **sim)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def deploy(db: FleetDB, version: str = "2", **kw: Any) -> str:
    args: dict[str, Any] = {"waves": (0.1, 0.5, 1.0), "wait_healthy_s": 60.0, "max_failure_rate": 0.05}
    args.update(kw)
    return create_rollout(
        db, fleet=FLEET, group=GROUP, model=MODEL, version=version, now=time.time(), **args
    ).id


def group_doc(rec: Recorder, pub: Ed25519PublicKey) -> dict[str, Any] | None:
    msgs = [m for m in rec.on(f"groups/{GROUP}/deployment") if m.payload]
    return docs_sign.verify_document(bytes(msgs[-1].payload), pub) if msgs else None


def test_rollout_advances_wave_by_wave_and_publishes_the_group_deployment(fleet_factory, broker, key) -> None:
    fl = fleet_factory(12)
    rec = Recorder(broker.port)
    fl.start_devices()
    rid = deploy(fl.db)
    fl.controller()
    wait_for(lambda: fl.state(rid) == "complete", WAIT_S, "rollout complete")
    waves: dict[int, list[SimDevice]] = {}
    for dev in fl.devices.values():
        assert len(dev.got) == 1 and dev.version == "2"
        waves.setdefault(dev.got[0][1]["wave"], []).append(dev)
    assert [len(waves[k]) for k in sorted(waves)] == [2, 4, 6]  # ceil(10% of 12), then 50%, then 100%
    for k in sorted(waves)[1:]:  # a wave is assigned only after every device of the one before was active
        first_assigned = min(d.got[0][0] for d in waves[k])
        assert all(d.active_at is not None and d.active_at < first_assigned for d in waves[k - 1])
    wait_for(lambda: group_doc(rec, key.public_key()) is not None, WAIT_S, "group deployment published")
    doc = group_doc(rec, key.public_key())
    assert doc is not None and doc["version"] == "2" and doc["target"] == "models/digits/2.edgepkg"
    assert doc["seq"] > max(d.got[0][1]["seq"] for d in fl.devices.values())
    wait_for(
        lambda: all(not m.payload for d in fl.names for m in rec.on(f"devices/{d}/assignment")[-1:]),
        WAIT_S,
        "assignments cleared",
    )
    st = fl.db.device_status(FLEET)
    assert all(st[d]["versions"] == {MODEL: "2"} and st[d]["p99"] == {MODEL: 4e-05} for d in fl.names)
    kinds = [e["kind"] for e in fl.db.events(FLEET, rollout=rid, limit=1000)]
    assert kinds.count("wave") == 3 and kinds[-1] == "complete" and kinds.count("update") == 12 * 5
    rec.close()


def test_rollout_halts_at_the_failure_threshold(fleet_factory, broker, key) -> None:
    bad = {f"dev-{i:02d}" for i in range(0, 20, 2)}  # half the fleet fails its health check

    fl = fleet_factory(20)
    for d in fl.names:
        fl.devices[d].behaviour = lambda doc, d=d: "fail" if d in bad and doc["wave"] > 0 else "ok"
    rec = Recorder(broker.port)
    fl.start_devices()
    rid = deploy(fl.db, waves=(0.1, 1.0), max_failure_rate=0.2, min_attempts=5)
    fl.controller()
    wait_for(lambda: fl.state(rid) == "halted", WAIT_S, "rollout halted")
    r = fl.db.rollout(rid)
    assert r is not None and r.reason is not None
    m = re.search(r"failure rate (\d+)/(\d+) = ([\d.]+)% exceeds 20.0%", r.reason)
    assert m, r.reason
    failed, attempted = int(m.group(1)), int(m.group(2))
    assert failed / attempted > 0.2 and attempted >= 5
    print(f"halted: {r.reason}")
    assert group_doc(rec, key.public_key()) is None  # the group's desired state never moved
    # devices already updating keep reporting after the halt (emergency shutdown stops new assignments)
    kinds = [e["kind"] for e in fl.db.events(FLEET, rollout=rid, limit=1000)]
    assert kinds.count("halt") == 1 and "complete" not in kinds
    rec.close()


def test_offline_device_blocks_then_times_out_and_catches_up(fleet_factory, broker, key) -> None:
    fl = fleet_factory(4)
    rid = deploy(fl.db, waves=(0.5, 1.0), wait_healthy_s=2.0)
    fl.controller()
    wait_for(lambda: fl.db.rollout(rid).current_wave == 0, WAIT_S, "wave 0 planned")  # type: ignore[union-attr]
    wave0 = [x["device"] for x in fl.db.rollout_devices(rid) if x["wave"] == 0]
    offline = wave0[0]
    fl.start_devices([d for d in fl.names if d != offline])
    wait_for(lambda: fl.state(rid) == "complete", WAIT_S, "rollout complete despite an offline device")
    assert fl.devices[offline].got == [] and fl.devices[offline].version == "1"
    fl.start_devices([offline])  # back online: its assignment was cleared; the retained group doc rules
    wait_for(lambda: fl.devices[offline].version == "2", WAIT_S, "the offline device catches up")
    wait_for(lambda: fl.db.device_status(FLEET)[offline]["versions"] == {MODEL: "2"}, WAIT_S, "status stored")
    # its late events are still recorded against the rollout (the group doc names it)
    wait_for(
        lambda: {x["device"]: x["state"] for x in fl.db.rollout_devices(rid)}[offline] == "active",
        WAIT_S,
        "late success recorded",
    )
    assert [e["kind"] for e in fl.db.events(FLEET, rollout=rid, limit=1000)].count("halt") == 0


def test_shadow_gate_promotes_or_halts(fleet_factory, broker, key) -> None:
    fl = fleet_factory(4, shadow=(0.99, 1.2))
    fl.start_devices()
    rid = deploy(fl.db, waves=(0.5, 1.0), shadow_percent=10.0, min_agreement=0.98, max_latency_ratio=1.5)
    fl.controller()
    wait_for(lambda: fl.state(rid) == "complete", WAIT_S, "shadowed rollout complete")
    for dev in fl.devices.values():  # each device first got a shadow doc, then the promotion
        assert [d["shadow"] for _, d in dev.got] == [{"percent": 10.0}, None]
        assert dev.got[0][1]["seq"] < dev.got[1][1]["seq"]
    kinds = [e["kind"] for e in fl.db.events(FLEET, rollout=rid, limit=1000)]
    assert kinds.count("shadow-passed") == 2

    for dev in fl.devices.values():
        dev.shadow = (0.91, 1.2)
    rid2 = deploy(
        fl.db, version="3", waves=(0.5, 1.0), shadow_percent=10.0, min_agreement=0.98, max_latency_ratio=1.5
    )
    wait_for(lambda: fl.state(rid2) == "halted", WAIT_S, "shadow gate halt")
    r = fl.db.rollout(rid2)
    assert r is not None and r.reason == "shadow agreement 0.9100 < 0.98"
    assert all(dev.version == "2" for dev in fl.devices.values())


def test_rollback_pause_resume_and_takeover(fleet_factory, broker, key) -> None:
    fl = fleet_factory(6)
    fl.start_devices()
    fl.db.set_deployed(FLEET, GROUP, MODEL, "1", 0, None)
    # Controller A starts the rollout but is paused at wave 0, then killed (no lease release).
    rid = deploy(fl.db, waves=(0.2, 1.0))
    a = fl.controller("ctl-a", ttl=1.0)
    wait_for(lambda: fl.db.rollout(rid).current_wave == 0, WAIT_S, "wave 0")  # type: ignore[union-attr]
    set_paused(fl.db, fleet=FLEET, group=GROUP, model=MODEL, paused=True, now=time.time())
    wave0 = [x["device"] for x in fl.db.rollout_devices(rid) if x["wave"] == 0]
    wait_for(lambda: all(fl.devices[d].version == "2" for d in wave0), WAIT_S, "wave 0 active")
    a.stop(release=False)
    b = fl.controller("ctl-b", ttl=1.0)
    wait_for(lambda: b.controller.acting, WAIT_S, "B takes the lease once A's expired")
    assert fl.db.rollout(rid).current_wave == 0  # type: ignore[union-attr]
    set_paused(fl.db, fleet=FLEET, group=GROUP, model=MODEL, paused=False, now=time.time())
    wait_for(lambda: fl.state(rid) == "complete", WAIT_S, "B completes A's rollout")
    assert b.controller.acting and fl.db.lease_holder(time.time(), f"fleet:{FLEET}") == "ctl-b"
    rb = request_rollback(fl.db, fleet=FLEET, group=GROUP, model=MODEL, now=time.time())
    assert rb.version == "1" and rb.kind == "rollback"
    wait_for(lambda: fl.state(rb.id) == "complete", WAIT_S, "rollback complete")
    assert all(dev.version == "1" for dev in fl.devices.values())
    assert fl.db.deployed_version(FLEET, GROUP, MODEL)[0] == "1"  # type: ignore[index]
