"""Device side of enrollment by claim: one MQTT round trip with the claim, and a broker check."""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any

from edgert.errors import ProvisionError

__all__ = ["CONNECT_TIMEOUT_S", "broker_check", "enroll_with_claim"]

CONNECT_TIMEOUT_S = 10.0


def _client(mqtt: dict[str, Any], username: str | None, password: str | None, client_id: str) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    proto = (
        MQTTProtocolVersion.MQTTv5 if str(mqtt.get("protocol", "5")) == "5" else MQTTProtocolVersion.MQTTv311
    )
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto)
    if username:
        c.username_pw_set(username, password)
    if mqtt.get("ca_file"):
        c.tls_set(ca_certs=mqtt["ca_file"], certfile=mqtt.get("cert_file"), keyfile=mqtt.get("key_file"))
    return c


def _connect(mqtt: dict[str, Any], client: Any, timeout: float) -> None:
    done = threading.Event()
    result: list[Any] = []

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any = None) -> None:
        result.append(reason)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(mqtt["host"], int(mqtt["port"]), keepalive=30)
    except (OSError, ValueError) as exc:
        raise ProvisionError(
            f"cannot connect to broker {mqtt['host']}:{mqtt['port']}: {exc}",
            hint="check the device's network and the broker address in the bundle",
        ) from None
    client.loop_start()
    if not done.wait(timeout):
        client.loop_stop()
        raise ProvisionError(
            f"cannot connect to broker {mqtt['host']}:{mqtt['port']}: no CONNACK in {timeout:g} s",
            hint="check the device's network and firewall",
        )
    if getattr(result[0], "is_failure", False):
        client.loop_stop()
        raise ProvisionError(
            f"broker refused the connection: {result[0]}",
            hint="the claim may be revoked or unknown to the broker; ask for a new bundle",
        )


def broker_check(
    mqtt: dict[str, Any], claim: dict[str, str] | None, *, timeout: float = CONNECT_TIMEOUT_S
) -> tuple[bool, str]:
    """(reachable, detail): connect once with the claim if one is installed, else the device's credential."""
    user, pw = (claim["id"], claim["secret"]) if claim else (None, None)
    c = _client(mqtt, user, pw, f"edgert-check-{secrets.token_hex(4)}")
    try:
        _connect(mqtt, c, timeout)
    except ProvisionError as exc:
        return False, exc.message
    c.disconnect()
    c.loop_stop()
    return True, f"connected to {mqtt['host']}:{mqtt['port']}"


def enroll_with_claim(
    mqtt: dict[str, Any],
    claim_id: str,
    secret: str,
    *,
    device: str,
    groups: list[str],
    csr: str,
    x25519: str,
    timeout: float = 15.0,
) -> str:
    """Send the CSR with the claim; return the device certificate (PEM). ProvisionError on refusal."""
    from edgert.fleet.enrollment import enroll_reply_topic, enroll_request_topic

    fleet = str(mqtt["fleet"])
    nonce = secrets.token_hex(8)
    c = _client(mqtt, claim_id, secret, f"{claim_id}-{nonce}")
    answer: list[dict[str, Any]] = []
    got, subscribed = threading.Event(), threading.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and doc.get("nonce") == nonce:
            answer.append(doc)
            got.set()

    c.on_message = on_message
    c.on_subscribe = lambda *a: subscribed.set()
    _connect(mqtt, c, min(timeout, CONNECT_TIMEOUT_S))
    try:
        c.subscribe(enroll_reply_topic(fleet, claim_id), qos=1)
        if not subscribed.wait(timeout):
            raise ProvisionError("the broker did not confirm the enrollment subscription")
        req = {
            "v": 1,
            "nonce": nonce,
            "device": device,
            "groups": list(groups),
            "csr": csr,
            "x25519": x25519,
            "secret": secret,
        }
        c.publish(enroll_request_topic(fleet, claim_id), json.dumps(req).encode(), qos=1)
        if not got.wait(timeout):
            raise ProvisionError(
                f"no enrollment answer from the fleet controller in {timeout:g} s",
                hint="is the fleet controller running with enrollment attached?",
            )
    finally:
        c.disconnect()
        c.loop_stop()
    doc = answer[0]
    if not doc.get("ok"):
        raise ProvisionError(f"enrollment refused: {doc.get('error')}", hint=doc.get("hint"))
    return str(doc["cert"])
