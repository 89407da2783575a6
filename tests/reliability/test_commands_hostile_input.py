"""Hostile MQTT command payloads get a defined refusal, a reply and an audit record (issue 9, D7).

Reported: a lone surrogate in the body and 400-digit ``iat``/``exp`` raised UnicodeEncodeError /
OverflowError (no reply, no audit record, tracebacks in the log ring), and a signed body with
``"iat": NaN`` and ``exp`` ten years ahead was accepted and executed.
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgert.device.commands import CommandProcessor
from edgert.device.sync import SyncService
from edgert.mqtt.signing import (
    CLOCK_SKEW_S,
    DOMAIN,
    MAX_COMMAND_TTL_S,
    REFUSAL_CODES,
    CommandRejected,
    NonceCache,
    sign_command,
    verify_command,
)
from edgert.security.audit import AuditLog, read_records
from tests.brokers import Mosquitto
from tests.mqtt.conftest import Recorder, make_config, require_mosquitto, wait_for

KEY = Ed25519PrivateKey.generate()
FLEET, DEVICE = "f1", "d1"
NOW = 1_800_000_000.0
TEN_YEARS_S = 10 * 365 * 86400
BIG = int("9" * 400)  # a 400-digit number: float() of it overflows

#: The verify-stage codes documented in docs/mqtt.md (replies add no_key, unknown_command, ...).
DOCUMENTED = {
    "unsigned", "bad_signature", "wrong_device", "expired", "bad_time", "replayed", "malformed",
    "too_large", "bad_version", "busy",
}


def _body(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": 1, "cmd": "ping", "args": {}, "fleet": FLEET, "device": DEVICE,
        "nonce": "ab" * 16, "iat": NOW, "exp": NOW + 60, "request_id": "r-1",
    }
    body.update(changes)
    return body


def _signed(body_text: str, key: Ed25519PrivateKey = KEY) -> bytes:
    """The wire bytes of a command whose body text is signed exactly as given (even if odd)."""
    sig = key.sign(DOMAIN + body_text.encode("utf-8", "surrogatepass"))
    return json.dumps({"v": 1, "body": body_text, "sig": base64.b64encode(sig).decode()}).encode()


def _outcome(payload: bytes, now: float = NOW) -> str:
    """'ok' or the refusal code; any other exception fails the test."""
    try:
        cmd = verify_command(
            payload, KEY.public_key(), fleet=FLEET, device=DEVICE, now=now, nonces=NonceCache()
        )
    except CommandRejected as exc:
        assert exc.code in REFUSAL_CODES, exc.code
        return exc.code
    # Whatever was accepted has a sane validity window.
    assert math.isfinite(cmd.iat) and math.isfinite(cmd.exp)
    assert cmd.exp > now and cmd.iat <= now + CLOCK_SKEW_S and 0 < cmd.exp - cmd.iat <= MAX_COMMAND_TTL_S
    return "ok"


@pytest.fixture
def processor(tmp_path: Path) -> tuple[CommandProcessor, AuditLog, list[Mapping[str, Any]]]:
    """A processor with a counting ping handler and the real (UTF-8, hash-chained) audit log."""
    audit = AuditLog(tmp_path / "audit")
    ran: list[Mapping[str, Any]] = []

    def ping(args: Mapping[str, Any]) -> Mapping[str, Any]:
        ran.append(args)
        return {"pong": True}

    proc = CommandProcessor(FLEET, DEVICE, KEY.public_key(), handlers={"ping": ping}, audit=audit.append)
    return proc, audit, ran


def test_refusal_codes_are_the_documented_set() -> None:
    assert set(REFUSAL_CODES) == DOCUMENTED


REPORTED = [
    pytest.param(b'{"v":1,"body":"\\ud800","sig":"AAAA"}', "malformed", id="lone-surrogate-envelope"),
    pytest.param(_signed(json.dumps(_body(iat=BIG))), "bad_time", id="400-digit-iat"),
    pytest.param(_signed(json.dumps(_body(exp=BIG))), "bad_time", id="400-digit-exp"),
    pytest.param(_signed(json.dumps(_body(iat=-BIG, exp=BIG))), "bad_time", id="400-digit-both"),
    pytest.param(_signed(json.dumps(_body(iat=math.nan, exp=NOW + TEN_YEARS_S))), "malformed", id="NaN-iat"),
    pytest.param(_signed(json.dumps(_body(exp=math.inf))), "malformed", id="Infinity-exp"),
    pytest.param(_signed(json.dumps(_body()).replace(f'"exp": {NOW + 60}', '"exp": 1e400')), "bad_time",
                 id="1e400-exp"),
    pytest.param(_signed(json.dumps(_body(iat=NOW + 60, exp=NOW + 30))), "bad_time", id="exp-before-iat"),
    pytest.param(_signed(json.dumps(_body(cmd="\ud800"))), "malformed", id="signed-lone-surrogate-cmd"),
    pytest.param(_signed(json.dumps(_body(request_id="\udfff"), ensure_ascii=False)), "malformed",
                 id="raw-surrogate-in-body-text"),
]


@pytest.mark.parametrize(("payload", "code"), REPORTED)
def test_reported_payloads_get_a_reply_and_an_audit_record(
    processor: tuple[CommandProcessor, AuditLog, list[Mapping[str, Any]]], payload: bytes, code: str
) -> None:
    proc, audit, ran = processor
    reply = proc.handle(payload, now=NOW)
    audit.close()
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    json.dumps(reply).encode()  # publishable
    refused = [r for r in read_records(audit.directory) if r.get("event") == "mqtt.command.refused"]
    assert [r["data"]["reason"] for r in refused] == [code]
    assert ran == [], "nothing was executed"


def test_nan_iat_with_a_ten_year_exp_is_not_executed(
    processor: tuple[CommandProcessor, AuditLog, list[Mapping[str, Any]]]
) -> None:
    proc, audit, ran = processor
    body = json.dumps(_body(iat=math.nan, exp=NOW + TEN_YEARS_S, nonce="cd" * 16))
    for now in (NOW, NOW + 3600, NOW + 365 * 86400):  # replayable for years before the fix
        assert proc.handle(_signed(body), now=now)["ok"] is False
    assert ran == []
    good = sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW)
    assert proc.handle(good, now=NOW)["ok"] is True and len(ran) == 1, "valid commands still run"
    audit.close()


# -- property: any JSON value in any field --------------------------------------------------------

TEXT = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=12)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([BIG, -BIG, 2**63, -(2**63), 0, -1, 1, NOW, NOW + 60])
    | st.floats()
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
MISSING = object()
ENVELOPE_FIELDS = ["v", "body", "sig", "extra"]
BODY_FIELDS = ["v", "cmd", "args", "fleet", "device", "nonce", "iat", "exp", "request_id", "extra"]


def _dumps(obj: Any, ascii_only: bool) -> bytes:
    # allow_nan writes NaN/Infinity tokens; without ensure_ascii lone surrogates reach the bytes raw.
    return json.dumps(obj, allow_nan=True, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(ENVELOPE_FIELDS), value=JSON | st.just(MISSING), ascii_only=st.booleans())
def test_any_json_value_in_any_envelope_field_gets_a_refusal_code(
    field: str, value: Any, ascii_only: bool
) -> None:
    env = json.loads(sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW))
    if value is MISSING:
        env.pop(field, None)
    else:
        env[field] = value
    _outcome(_dumps(env, ascii_only))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(BODY_FIELDS), value=JSON | st.just(MISSING), ascii_only=st.booleans())
def test_any_json_value_in_any_signed_body_field_gets_a_refusal_code(
    field: str, value: Any, ascii_only: bool
) -> None:
    body = _body()
    if value is MISSING:
        body.pop(field, None)
    else:
        body[field] = value
    text = json.dumps(body, allow_nan=True, ensure_ascii=ascii_only)
    _outcome(_signed(text))  # signed with the fleet key: every check past the signature runs


@settings(max_examples=200, deadline=None)
@given(body=JSON)
def test_any_json_document_as_the_signed_body_gets_a_refusal_code(body: Any) -> None:
    assert _outcome(_signed(json.dumps(body, allow_nan=True))) != "ok"


# -- end to end: a real broker, the sync service, the real audit log --------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto on a free loopback port."""
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.mark.integration
def test_hostile_commands_over_mqtt_get_replies_audit_records_and_no_tracebacks(
    tmp_path: Path, broker: Mosquitto
) -> None:
    pub = tmp_path / "fleet-cmd.pub"
    pub.write_bytes(
        KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cfg = make_config(tmp_path, broker.port, fleet=FLEET, device_id=DEVICE, command_key_file=str(pub),
                      telemetry_interval=3600)
    cmd_topic = f"edgert/v1/{FLEET}/devices/{DEVICE}/cmd"
    audit = AuditLog(tmp_path / "audit")
    rec = Recorder(broker.port)
    svc = SyncService(cfg, audit=audit.append)
    svc.start()
    try:
        wait_for(lambda: any(d["state"] == "online" for d in rec.json_on("/status")), what="online status")
        now = time.time()
        hostile = [
            b'{"v":1,"body":"\\ud800","sig":"AAAA"}',
            _signed(json.dumps(_body(iat=BIG, exp=BIG, nonce="01" * 16, request_id="big"))),
            _signed(
                json.dumps(_body(iat=math.nan, exp=now + TEN_YEARS_S, nonce="02" * 16, request_id="nan"))
            ),
        ]
        for payload in hostile:
            rec.publish(cmd_topic, payload)
        wait_for(lambda: len(rec.on("/reply")) >= len(hostile), what="a reply to every hostile command")
        replies = rec.json_on("/reply")
        assert [(r["ok"], r["error"]["code"]) for r in replies] == [
            (False, "malformed"), (False, "bad_time"), (False, "malformed")
        ]
        logs = sign_command(KEY, cmd="collect-logs", fleet=FLEET, device=DEVICE, now=time.time(),
                            args={"lines": 200}, request_id="logs")
        rec.publish(cmd_topic, logs)
        wait_for(
            lambda: any(r.get("request_id") == "logs" for r in rec.json_on("/reply")), what="collect-logs"
        )
        lines = next(r for r in rec.json_on("/reply") if r.get("request_id") == "logs")["result"]["lines"]
        # refusals are logged once per reason and minute (a flood must not flood the log): 2 reasons here
        refused = [json.loads(line) for line in lines if '"command refused"' in line]
        assert sorted(r["reason"] for r in refused) == ["bad_time", "malformed"]
        assert not [line for line in lines if "Traceback" in line or "processing failed" in line]
    finally:
        svc.stop()
        rec.close()
        audit.close()
    records = list(read_records(audit.directory))
    refused = [r["data"]["reason"] for r in records if r["event"] == "mqtt.command.refused"]
    assert refused == ["malformed", "bad_time", "malformed"]
