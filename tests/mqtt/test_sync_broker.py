"""SyncService against a real mosquitto: status, telemetry store-and-forward through outages, rejects."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.device.sync import SyncService
from tests.brokers import DEVICE_ACL, Mosquitto
from tests.mqtt.conftest import (
    Recorder,
    assert_complete_in_order,
    make_config,
    require_mosquitto,
    telemetry_seqs,
    wait_for,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "digits_small_int8.onnx"


class Inference:
    """A thread running real inference, counting calls, to show sync never blocks it."""

    def __init__(self) -> None:
        from edgert import Runtime

        self.model = Runtime(profile="cpu-generic").load(MODEL)
        self.calls = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        x = {"pixels": np.zeros((1, 64), np.float32)}
        while not self.stop.is_set():
            self.model.infer(x)
            self.calls += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.model.close()


@pytest.fixture
def service_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[SyncService] = []

    def make(port: int, **kw: Any) -> SyncService:
        providers = {
            k: kw.pop(k) for k in ("status_provider", "stats_provider", "handlers", "audit") if k in kw
        }
        svc = SyncService(make_config(tmp_path, port, **kw), **providers)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        if svc._threads:
            svc.stop()


def test_status_online_with_info_then_graceful_offline(broker: Mosquitto, service_factory: Any) -> None:
    rec = Recorder(broker.port)
    info = {"profile": "cpu-generic", "providers": ["CPUExecutionProvider"], "models": {"digits": "3"}}
    svc = service_factory(broker.port, status_provider=lambda: info)
    svc.start()
    wait_for(lambda: rec.on("/status"), what="online status")
    online = rec.json_on("/status")[0]
    assert online["state"] == "online" and online["v"] == 1
    assert online["models"] == {"digits": "3"} and online["providers"] == ["CPUExecutionProvider"]
    assert online["profile"] == "cpu-generic" and "uptime_s" in online and online["edgert"]
    assert rec.on("/status")[0].retain is False  # live delivery; retained copy checked below
    svc.stop()
    wait_for(lambda: rec.json_on("/status")[-1]["state"] == "offline", what="offline status")
    assert rec.json_on("/status")[-1]["graceful"] is True
    rec.close()
    late = Recorder(broker.port)  # a new subscriber gets the retained value
    wait_for(lambda: late.on("/status"), what="retained status")
    assert late.on("/status")[0].retain and late.json_on("/status")[0]["state"] == "offline"
    late.close()


DEVICE_SCRIPT = """
import json, sys, time
from edgert.device.sync_config import MqttSettings
from edgert.device.sync import SyncService
svc = SyncService(MqttSettings.from_dict(json.loads(sys.argv[1]), "child"))
svc.start()
svc.link.wait_connected(20)
print("up", flush=True)
time.sleep(120)
"""


def test_last_will_marks_a_dead_device_offline(tmp_path: Path, broker: Mosquitto) -> None:
    rec = Recorder(broker.port)
    cfg = {
        "host": "127.0.0.1",
        "port": broker.port,
        "fleet": "f1",
        "device_id": "dev-a",
        "keepalive": 5,
        "spool_path": str(tmp_path / "child.sqlite"),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", DEVICE_SCRIPT, json.dumps(cfg)], stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"up"
        wait_for(lambda: rec.on("/status"), what="online")
        os.kill(child.pid, signal.SIGKILL)  # no DISCONNECT: the broker must send the will
        child.wait(10)
        wait_for(lambda: rec.json_on("/status")[-1]["state"] == "offline", what="last will")
        assert rec.json_on("/status")[-1]["graceful"] is False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout:
            child.stdout.close()
        rec.close()


def test_broker_down_at_start_then_everything_replayed(tmp_path: Path, service_factory: Any) -> None:
    require_mosquitto()
    b = Mosquitto(tmp_path / "late")  # not started yet
    svc = service_factory(b.port, reconnect_min=1.0, reconnect_max=1.0)
    svc.start()
    wait_for(lambda: svc.seq >= 5, what="telemetry spooled while the broker is down")
    assert svc.stats()["connected"] is False and "connection refused" in svc.stats()["last_error"]
    b.start()
    try:
        rec = Recorder(b.port)
        wait_for(lambda: svc.stats()["connected"], what="connect")
        upto = svc.seq
        wait_for(lambda: {s for s, _ in telemetry_seqs(rec)} >= set(range(1, upto + 1)), what="replay")
        seqs = telemetry_seqs(rec)
        assert_complete_in_order(seqs, upto)
        assert all(r for s, r in seqs if s <= 5), "records spooled while offline must carry replayed=true"
        wait_for(
            lambda: any(s > upto and not r for s, r in telemetry_seqs(rec)), what="live records after replay"
        )
        rec.close()
    finally:
        svc.stop()
        b.stop()


def _outage(tmp_path: Path, service_factory: Any, outage_s: float, *, wipe: bool) -> None:
    require_mosquitto()
    b = Mosquitto(tmp_path / "b", persistence=not wipe).start()
    infer = Inference()
    svc = service_factory(b.port, reconnect_min=0.5, reconnect_max=1.0, telemetry_interval=0.05)
    rec1 = Recorder(b.port)
    rec2: Recorder | None = None
    svc.start()
    try:
        wait_for(lambda: len(rec1.on("/telemetry")) >= 5, what="live telemetry")
        b.kill()
        if wipe:
            b.wipe_state()
        calls_before, seq_before = infer.calls, svc.seq
        stop = threading.Event()
        stop.wait(outage_s)
        assert svc.seq > seq_before, "telemetry kept being spooled during the outage"
        assert infer.calls > calls_before, "inference kept running during the outage"
        b.start()
        rec2 = Recorder(b.port)
        wait_for(lambda: svc.link.connects >= 2, what="reconnect")
        upto = svc.seq
        wait_for(
            lambda: {s for s, _ in telemetry_seqs(rec1, rec2)} >= set(range(1, upto + 1)),
            timeout=60 + outage_s,
            what="all telemetry after the outage",
        )
        seqs = telemetry_seqs(rec1, rec2)
        assert_complete_in_order(seqs, upto)
        replayed = [s for s, r in telemetry_seqs(rec2) if r]
        assert replayed and min(replayed) <= seq_before + 1, "records from the outage are flagged replayed"
        assert svc.stats()["spool"]["dropped_full"] == 0
    finally:
        svc.stop()
        infer.close()
        rec1.close()
        if rec2:
            rec2.close()
        b.stop()


def test_broker_killed_and_restarted_loses_nothing(tmp_path: Path, service_factory: Any) -> None:
    _outage(tmp_path, service_factory, 2.0, wipe=False)


def test_broker_restarted_with_clean_state_loses_nothing(tmp_path: Path, service_factory: Any) -> None:
    _outage(tmp_path, service_factory, 1.0, wipe=True)


@pytest.mark.slow
def test_sixty_second_outage_loses_nothing(tmp_path: Path, service_factory: Any) -> None:
    _outage(tmp_path, service_factory, 60.0, wipe=False)


def test_paused_broker_partition_then_resume(tmp_path: Path, broker: Mosquitto, service_factory: Any) -> None:
    rec = Recorder(broker.port)
    svc = service_factory(broker.port, telemetry_interval=0.05, max_inflight=20)
    svc.start()
    try:
        wait_for(lambda: len(rec.on("/telemetry")) >= 3, what="live telemetry")
        broker.pause()
        seq0 = svc.seq
        threading.Event().wait(2.0)
        assert svc.seq > seq0 + 10, "spooling continues while the broker is unresponsive"
        assert svc.stats()["inflight"] <= 20
        broker.resume()
        upto = svc.seq
        wait_for(
            lambda: {s for s, _ in telemetry_seqs(rec)} >= set(range(1, upto + 1)),
            timeout=60,
            what="telemetry after partition",
        )
        assert_complete_in_order(telemetry_seqs(rec), upto)
    finally:
        broker.resume()
        svc.stop()
        rec.close()


def test_rejected_record_is_set_aside_and_does_not_block(
    tmp_path: Path, pki: dict[str, Any], service_factory: Any
) -> None:
    """A spooled message the broker refuses (MQTT 5 reason 0x87) moves aside; the rest still flow."""
    require_mosquitto()
    cert, key = pki["server"]
    b = Mosquitto(
        tmp_path / "acl", tls=(pki["ca"].path, cert, key), require_certificate=True, acl=DEVICE_ACL
    ).start()
    try:
        fc, fk = pki["fleet"]
        rec = Recorder(b.port, tls=(pki["ca"].path, fc, fk))
        ac, ak = pki["dev-a"]
        svc = service_factory(
            b.port, ca_file=str(pki["ca"].path), cert_file=str(ac), key_file=str(ak), telemetry_interval=3600
        )
        bad = b'{"v":1,"x":"forbidden"}'
        svc.spool.enqueue("edgert/v1/f1/devices/dev-b/events", bad, 1.0)
        for i in range(5):
            svc.spool.enqueue(svc.events_topic, json.dumps({"v": 1, "i": i}).encode(), 1.0)
        svc.start()
        wait_for(lambda: len(rec.on("dev-a/events")) == 5, what="events after the rejected one")
        wait_for(lambda: svc.spool.pending == 0, what="spool drained")
        assert svc.spool.stats()["rejected"] == 1
        aside = svc.spool.rejected()
        assert aside[0]["reason_code"] == 0x87 and aside[0]["topic"].endswith("dev-b/events")
        assert [json.loads(m.payload)["i"] for m in rec.on("dev-a/events")] == list(range(5))
        rec.close()
    finally:
        b.stop()
