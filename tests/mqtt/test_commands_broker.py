"""Signed commands through a real mosquitto: correlation (MQTT 5 and 3.1.1), refusals and audit."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgert.device.sync import SyncService
from edgert.mqtt.signing import sign_command
from tests.brokers import Mosquitto
from tests.mqtt.conftest import DEVICE, FLEET, Recorder, make_config, wait_for

pytestmark = pytest.mark.integration
CMD = f"edgert/v1/{FLEET}/devices/{DEVICE}/cmd"


def _service(
    tmp_path: Path, port: int, pub: Path, audit: list[tuple[str, dict[str, Any]]], **kw: Any
) -> SyncService:
    activated: list[dict[str, Any]] = []

    def activate(args: Any) -> dict[str, Any]:
        activated.append(dict(args))
        return {"model": args["model"], "version": args["version"], "active": True}

    svc = SyncService(
        make_config(tmp_path, port, command_key_file=str(pub), telemetry_interval=3600, **kw),
        status_provider=lambda: {"profile": "cpu-generic", "models": {"digits": "1"}},
        handlers={"activate-model": activate},
        audit=lambda event, **fields: audit.append((event, fields)),
        log_tail=lambda n: [f"line {i}" for i in range(1000)][-n:],
    )
    svc.activated = activated  # type: ignore[attr-defined]
    return svc


def _corr(data: bytes) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.CorrelationData = data
    return props


def test_signed_commands_mqtt5_with_correlation_data(
    tmp_path: Path, broker: Mosquitto, command_key: Any
) -> None:
    key, pub = command_key
    audit: list[tuple[str, dict[str, Any]]] = []
    rec = Recorder(broker.port)
    svc = _service(tmp_path, broker.port, pub, audit)
    svc.start()
    try:
        assert svc.link.wait_connected(10)
        wait_for(lambda: rec.on("/status"), what="online")
        now = time.time()

        def send(payload: bytes, corr: bytes) -> dict[str, Any]:
            rec.publish(CMD, payload, _corr(corr))
            wait_for(
                lambda: any(m.properties.CorrelationData == corr for m in rec.on("/reply")), what="reply"
            )
            msg = next(m for m in rec.on("/reply") if m.properties.CorrelationData == corr)
            return json.loads(msg.payload)

        ping = send(
            sign_command(key, cmd="ping", fleet=FLEET, device=DEVICE, now=now, args={"echo": "hi"}), b"c1"
        )
        assert ping["ok"] and ping["result"] == {"pong": True, "echo": "hi"}

        act = sign_command(
            key,
            cmd="activate-model",
            fleet=FLEET,
            device=DEVICE,
            now=now,
            args={"model": "digits", "version": "2"},
        )
        assert send(act, b"c2")["result"]["active"] is True
        assert svc.activated == [{"model": "digits", "version": "2"}]  # type: ignore[attr-defined]
        replay = send(act, b"c3")
        assert replay["ok"] is False and replay["error"]["code"] == "replayed"
        assert len(svc.activated) == 1  # type: ignore[attr-defined]

        interval = send(
            sign_command(
                key, cmd="set-telemetry-interval", fleet=FLEET, device=DEVICE, now=now, args={"seconds": 5}
            ),
            b"c4",
        )
        assert interval["ok"] and svc.interval == 5.0
        logs = send(
            sign_command(
                key, cmd="collect-logs", fleet=FLEET, device=DEVICE, now=now, args={"lines": 10_000}
            ),
            b"c5",
        )
        assert (
            logs["ok"] and len(logs["result"]["lines"]) == 200 and logs["result"]["lines"][-1] == "line 999"
        )
        status = send(sign_command(key, cmd="get-status", fleet=FLEET, device=DEVICE, now=now), b"c6")
        assert status["result"]["status"]["models"] == {"digits": "1"}
        reboot = send(sign_command(key, cmd="reboot-daemon", fleet=FLEET, device=DEVICE, now=now), b"c7")
        assert reboot["error"]["code"] == "unsupported"

        # Anyone who can publish to the topic still cannot command the device.
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        forged = sign_command(
            Ed25519PrivateKey.generate(),
            cmd="activate-model",
            fleet=FLEET,
            device=DEVICE,
            now=now,
            args={"model": "evil", "version": "9"},
        )
        assert send(forged, b"x1")["error"]["code"] == "bad_signature"
        assert send(b'{"v":1,"body":"{}"}', b"x2")["error"]["code"] == "unsigned"
        expired = sign_command(key, cmd="ping", fleet=FLEET, device=DEVICE, now=now - 120, ttl=60)
        assert send(expired, b"x3")["error"]["code"] == "expired"
        assert send(b"\xff not json", b"x4")["error"]["code"] == "malformed"
        assert send(b"{" + b" " * 70_000 + b"}", b"x5")["error"]["code"] == "too_large"
        assert send(json.dumps({"v": 2}).encode(), b"x6")["error"]["code"] == "bad_version"
        assert len(svc.activated) == 1  # type: ignore[attr-defined]
        refused = [f["reason"] for e, f in audit if e == "mqtt.command.refused"]
        assert refused == [
            "replayed",
            "bad_signature",
            "unsigned",
            "expired",
            "malformed",
            "too_large",
            "bad_version",
        ]
    finally:
        svc.stop()
        rec.close()


def test_commands_in_mqtt311_mode_use_request_id(tmp_path: Path, broker: Mosquitto, command_key: Any) -> None:
    key, pub = command_key
    audit: list[tuple[str, dict[str, Any]]] = []
    rec = Recorder(broker.port)
    svc = _service(tmp_path, broker.port, pub, audit, protocol="3.1.1")
    svc.start()
    try:
        assert svc.link.wait_connected(10)
        wait_for(lambda: rec.on("/status"), what="online")
        rec.publish(
            CMD,
            sign_command(key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time(), request_id="req-42"),
        )
        wait_for(lambda: rec.on("/reply"), what="reply")
        reply = rec.json_on("/reply")[0]
        assert reply["request_id"] == "req-42" and reply["ok"] is True
    finally:
        svc.stop()
        rec.close()


def test_commands_disabled_without_pinned_key(tmp_path: Path, broker: Mosquitto, command_key: Any) -> None:
    key, _ = command_key
    rec = Recorder(broker.port)
    svc = SyncService(make_config(tmp_path, broker.port, telemetry_interval=3600))
    svc.start()
    try:
        assert svc.link.wait_connected(10)
        wait_for(lambda: rec.on("/status"), what="online")
        rec.publish(
            CMD, sign_command(key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time()), _corr(b"k")
        )
        wait_for(lambda: rec.on("/reply"), what="reply")
        assert rec.json_on("/reply")[0]["error"]["code"] == "no_key"
    finally:
        svc.stop()
        rec.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_full_command_queue_replies_busy_then_queued_commands_complete(
    tmp_path: Path, broker: Mosquitto, command_key: Any, protocol: str
) -> None:
    import threading

    from edgert.device.sync import COMMAND_QUEUE

    key, pub = command_key
    entered, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def blocking(args: Any) -> dict[str, Any]:
        entered.set()
        assert release.wait(60), "test never released the handler"
        ran.append(args["version"])
        return {"model": args["model"], "version": args["version"]}

    rec = Recorder(broker.port)
    svc = SyncService(
        make_config(
            tmp_path, broker.port, command_key_file=str(pub), telemetry_interval=3600, protocol=protocol
        ),
        handlers={"activate-model": blocking},
    )
    svc.start()
    mqtt5 = protocol == "5"

    def send(payload: bytes, rid: str) -> None:
        rec.publish(CMD, payload, _corr(rid.encode()) if mqtt5 else None)

    def replies(rid: str) -> list[dict[str, Any]]:
        # Correlate exactly as a fleet would: correlation data with MQTT 5, request_id with 3.1.1.
        out = []
        for m in rec.on("/reply"):
            doc = json.loads(m.payload)
            if mqtt5:
                if getattr(m.properties, "CorrelationData", None) == rid.encode():
                    assert doc.get("request_id") == rid
                    out.append(doc)
            elif doc.get("request_id") == rid:
                out.append(doc)
        return out

    def activate(i: int) -> bytes:
        return sign_command(
            key,
            cmd="activate-model",
            fleet=FLEET,
            device=DEVICE,
            now=time.time(),
            args={"model": "m", "version": str(i)},
            request_id=f"q{i}",
        )

    try:
        assert svc.link.wait_connected(10)
        wait_for(lambda: rec.on("/status"), what="online")
        # One command occupies the worker, COMMAND_QUEUE more fill the queue.
        send(activate(0), "q0")
        wait_for(entered.is_set, what="handler entered")
        for i in range(1, COMMAND_QUEUE + 1):
            send(activate(i), f"q{i}")
        overflow = sign_command(
            key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time(), request_id="over"
        )
        send(overflow, "over")
        wait_for(lambda: replies("over"), what="busy reply")
        (busy,) = replies("over")
        assert busy["ok"] is False and busy["error"]["code"] == "busy"
        assert busy["device"] == DEVICE and "result" not in busy
        assert svc.stats()["commands_busy"] == 1
        assert not [m for m in rec.on("/reply") if json.loads(m.payload).get("request_id") != "over"]

        release.set()
        for i in range(COMMAND_QUEUE + 1):
            wait_for(lambda i=i: replies(f"q{i}"), what=f"reply to q{i}")
            (doc,) = replies(f"q{i}")
            assert doc["ok"] is True and doc["result"]["version"] == str(i)
        assert ran == [str(i) for i in range(COMMAND_QUEUE + 1)]
        assert len(replies("over")) == 1  # the overflow command was never executed

        # It was not verified either: its nonce was not recorded, so the fleet can send it again.
        send(overflow, "over")
        wait_for(lambda: len(replies("over")) == 2, what="reply to the resent command")
        assert replies("over")[1]["ok"] is True and replies("over")[1]["result"]["pong"] is True
        assert svc.stats()["commands_busy"] == 1 and svc.stats()["commands"] == COMMAND_QUEUE + 2
    finally:
        release.set()
        svc.stop()
        rec.close()
