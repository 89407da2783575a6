"""Connection, TLS and ACL checks behind ``edgert mqtt test``: connect once and report what works."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any

from edgert.errors import SyncError
from edgert.mqtt import topics
from edgert.mqtt.client import MqttLink
from edgert.mqtt.config import BrokerConfig

__all__ = ["PROBE_TIMEOUT_S", "Check", "probe"]

PROBE_TIMEOUT_S = 10.0
#: A device id no real device uses; publishing under it must be denied by the broker ACL.
FOREIGN_DEVICE = "edgert-acl-probe"


@dataclass(frozen=True)
class Check:
    """One probe result: ok is True, False, or None when the broker cannot tell us."""

    name: str
    ok: bool | None
    detail: str


class _Acks:
    def __init__(self) -> None:
        self.codes: dict[int, tuple[int, str]] = {}
        self.cond = threading.Condition()
        self.suback: list[int] = []

    def puback(self, mid: int, code: int, reason: str) -> None:
        with self.cond:
            self.codes[mid] = (code, reason)
            self.cond.notify_all()

    def wait(self, mid: int, timeout: float) -> tuple[int, str] | None:
        with self.cond:
            self.cond.wait_for(lambda: mid in self.codes, timeout)
            return self.codes.get(mid)


def probe(cfg: BrokerConfig, fleet: str, device_id: str, timeout: float = PROBE_TIMEOUT_S) -> list[Check]:
    """Connect with ``cfg`` as ``device_id`` of ``fleet``; check TLS/auth, publishing, the cmd
    subscription and the ACL.

    Raises SyncError (with the converted TLS/auth reason) if the connection itself fails.
    """
    acks = _Acks()
    link = MqttLink(cfg, on_puback=acks.puback)
    subscribed = threading.Event()

    def on_subscribe(client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any) -> None:
        acks.suback[:] = [int(getattr(r, "value", r)) for r in reasons]
        subscribed.set()

    link.client.on_subscribe = on_subscribe
    link.start()
    try:
        if not link.wait_connected(timeout):
            raise link.last_error or SyncError(
                f"could not connect to {cfg.host}:{cfg.port} within {timeout:.0f} s"
            )
        mode = (
            f"TLS with {cfg.ca_file}" + (", client certificate" if cfg.cert_file else "")
            if cfg.tls
            else "plain"
        )
        checks = [Check("connect", True, f"connected to {cfg.host}:{cfg.port} (MQTT {cfg.protocol}, {mode})")]
        own = topics.device_topic(fleet, device_id, "events")
        checks.append(_check_publish(link, acks, own, timeout))
        cmd = topics.device_topic(fleet, device_id, "cmd")
        checks.append(_check_subscribe(link, acks, cmd, subscribed, timeout))
        foreign = topics.device_topic(fleet, FOREIGN_DEVICE, "events")
        checks.append(_check_acl(link, acks, cfg, foreign, timeout))
        return checks
    finally:
        link.stop()


def _check_publish(link: MqttLink, acks: _Acks, topic: str, timeout: float) -> Check:
    mid = link.publish(topic, json.dumps({"v": 1, "type": "mqtt-test"}).encode())
    got = acks.wait(mid, timeout)
    if got is None:
        return Check("publish", False, f"no PUBACK for {topic}")
    if got[0] >= 0x80:
        return Check("publish", False, f"broker refused publish to {topic}: {got[1]} (check the broker ACL)")
    return Check("publish", True, f"can publish to {topic}")


def _check_subscribe(link: MqttLink, acks: _Acks, topic: str, done: threading.Event, timeout: float) -> Check:
    link.subscribe(topic)
    if not done.wait(timeout):
        return Check("subscribe", False, f"no SUBACK for {topic}")
    if not acks.suback or acks.suback[0] >= 0x80:
        return Check("subscribe", False, f"broker refused subscription to {topic} (check the broker ACL)")
    return Check("subscribe", True, f"can subscribe to {topic}")


def _check_acl(link: MqttLink, acks: _Acks, cfg: BrokerConfig, topic: str, timeout: float) -> Check:
    if not cfg.mqtt5:
        return Check("acl", None, "MQTT 3.1.1 brokers do not report denied publishes; cannot check the ACL")
    mid = link.publish(topic, json.dumps({"v": 1, "type": "mqtt-acl-probe"}).encode())
    got = acks.wait(mid, timeout)
    if got is not None and got[0] >= 0x80:
        return Check("acl", True, f"publishing as another device is denied ({got[1]})")
    return Check(
        "acl", False, f"broker accepted a publish to {topic}: its ACL lets this device pose as others"
    )
