"""Real mosquitto: password auth, TLS, mutual TLS with ACLs, and actionable errors for each failure."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgert.cli.main import main as cli_main
from edgert.errors import SyncError
from edgert.mqtt.client import MqttLink
from edgert.mqtt.probe import probe
from tests.brokers import DEVICE_ACL, Mosquitto
from tests.mqtt.conftest import DEVICE, FLEET, Recorder, make_config, require_mosquitto, wait_for

pytestmark = pytest.mark.integration


def _connect_error(cfg: Any, timeout: float = 10.0) -> SyncError:
    link = MqttLink(cfg.broker)
    link.start()
    try:
        wait_for(lambda: link.last_error is not None or link.connected.is_set(), timeout, "connect result")
        assert not link.connected.is_set(), "connection should have been refused"
        assert link.last_error is not None
        return link.last_error
    finally:
        link.stop()


def _pwfile(tmp_path: Path, secret: str) -> str:
    p = tmp_path / "mqtt.pass"
    p.write_text(secret + "\n")
    p.chmod(0o600)
    return str(p)


def test_password_auth_and_wrong_password(tmp_path: Path) -> None:
    require_mosquitto()
    b = Mosquitto(tmp_path / "pw", passwords={"dev-a": "s3cret-A"}, anonymous=False).start()
    try:
        good = make_config(tmp_path, b.port, username="dev-a", password_file=_pwfile(tmp_path, "s3cret-A"))
        checks = probe(good.broker, FLEET, DEVICE)
        assert checks[0].ok and checks[1].ok and checks[2].ok
        (tmp_path / "bad").mkdir()
        bad = make_config(tmp_path, b.port, username="dev-a", password_file=_pwfile(tmp_path / "bad", "nope"))
        err = _connect_error(bad)
        assert "user name or password" in err.message and err.hint and "password_file" in err.hint
        assert "nope" not in str(err)  # the secret never appears in errors
    finally:
        b.stop()


def test_password_file_with_loose_mode_is_refused(tmp_path: Path, broker: Mosquitto) -> None:
    p = tmp_path / "loose.pass"
    p.write_text("x")
    p.chmod(0o644)
    cfg = make_config(tmp_path, broker.port, username="u", password_file=str(p))
    with pytest.raises(Exception, match="readable by others"):
        MqttLink(cfg.broker)


def test_tls_server_only_and_wrong_ca(tmp_path: Path, pki: dict[str, Any]) -> None:
    require_mosquitto()
    cert, key = pki["server"]
    b = Mosquitto(tmp_path / "tls", tls=(pki["ca"].path, cert, key)).start()
    try:
        ok = probe(make_config(tmp_path, b.port, ca_file=str(pki["ca"].path)).broker, FLEET, DEVICE)
        assert ok[0].ok and "TLS" in ok[0].detail
        wrong = make_config(tmp_path, b.port, ca_file=str(pki["other_ca"].path))
        err = _connect_error(wrong)
        assert err.message == (
            f"certificate verify failed: the broker's certificate is not signed by {pki['other_ca'].path}"
        )
        plain = make_config(tmp_path, b.port)  # TLS port spoken to in plain MQTT
        assert _connect_error(plain).message
    finally:
        b.stop()


def test_mtls_acl_denies_publishing_as_another_device(
    tmp_path: Path, mtls_broker: Mosquitto, pki: dict[str, Any]
) -> None:
    ca = pki["ca"].path
    fleet_cert, fleet_key = pki["fleet"]
    rec = Recorder(mtls_broker.port, "edgert/#", tls=(ca, fleet_cert, fleet_key))
    a_cert, a_key = pki["dev-a"]
    cfg = make_config(tmp_path, mtls_broker.port, ca_file=str(ca), cert_file=str(a_cert), key_file=str(a_key))
    checks = {c.name: c for c in probe(cfg.broker, FLEET, DEVICE)}
    assert checks["connect"].ok and checks["publish"].ok and checks["subscribe"].ok
    assert checks["acl"].ok, checks["acl"].detail

    codes: dict[int, int] = {}
    link = MqttLink(cfg.broker, on_puback=lambda mid, code, reason: codes.__setitem__(mid, code))
    link.start()
    try:
        assert link.wait_connected(10)
        own = link.publish("edgert/v1/f1/devices/dev-a/telemetry", b'{"v":1,"who":"a"}')
        forged = link.publish("edgert/v1/f1/devices/dev-b/telemetry", b'{"v":1,"who":"a-as-b"}')
        wait_for(lambda: own in codes and forged in codes, what="PUBACKs")
        assert codes[own] == 0
        assert codes[forged] == 0x87  # Not authorized
        wait_for(lambda: rec.on("dev-a/telemetry"), what="own telemetry")
    finally:
        link.stop()
    assert rec.on("dev-b/telemetry") == []  # the fleet never saw the forged message
    rec.close()


def test_mtls_expired_client_certificate(tmp_path: Path, mtls_broker: Mosquitto, pki: dict[str, Any]) -> None:
    cert, key = pki["expired"]
    cfg = make_config(
        tmp_path, mtls_broker.port, ca_file=str(pki["ca"].path), cert_file=str(cert), key_file=str(key)
    )
    err = _connect_error(cfg)
    assert "expired" in err.message and str(cert) in err.message


def test_mtls_without_client_certificate(tmp_path: Path, mtls_broker: Mosquitto, pki: dict[str, Any]) -> None:
    err = _connect_error(make_config(tmp_path, mtls_broker.port, ca_file=str(pki["ca"].path)))
    assert err.message


def test_broker_down_gives_actionable_error(tmp_path: Path) -> None:
    from tests.brokers import free_port

    err = _connect_error(make_config(tmp_path, free_port()))
    assert "connection refused" in err.message and err.hint


def test_cli_mqtt_test_prints_what_works(
    tmp_path: Path, mtls_broker: Mosquitto, pki: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    a_cert, a_key = pki["dev-a"]
    conf = tmp_path / "edgert.toml"
    conf.write_text(
        "[mqtt]\n"
        f'host = "127.0.0.1"\nport = {mtls_broker.port}\nfleet = "f1"\ndevice_id = "dev-a"\n'
        f'ca_file = "{pki["ca"].path}"\ncert_file = "{a_cert}"\nkey_file = "{a_key}"\n'
    )
    assert cli_main(["mqtt", "test", "--config", str(conf)]) == 0
    out = capsys.readouterr().out
    assert "ok   connect" in out and "ok   acl" in out

    conf.write_text(conf.read_text().replace(str(pki["ca"].path), str(pki["other_ca"].path)))
    assert cli_main(["mqtt", "test", "--config", str(conf), "--timeout", "5"]) == 13
    err = capsys.readouterr().err
    assert "error: certificate verify failed: the broker's certificate is not signed by" in err


def test_acl_lets_fleet_command_reach_device_but_not_other_devices(
    tmp_path: Path, mtls_broker: Mosquitto, pki: dict[str, Any]
) -> None:
    """Device B cannot even publish to device A's cmd topic: the ACL is the first line of defence."""
    ca = pki["ca"].path
    b_cert, b_key = pki["dev-b"]
    cfg_b = make_config(
        tmp_path,
        mtls_broker.port,
        device_id="dev-b",
        ca_file=str(ca),
        cert_file=str(b_cert),
        key_file=str(b_key),
    )
    codes: dict[int, int] = {}
    link = MqttLink(cfg_b.broker, on_puback=lambda mid, code, reason: codes.__setitem__(mid, code))
    link.start()
    try:
        assert link.wait_connected(10)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"x"
        mid = link.publish("edgert/v1/f1/devices/dev-a/cmd", json.dumps({"v": 1}).encode(), properties=props)
        wait_for(lambda: mid in codes, what="PUBACK")
        assert codes[mid] == 0x87
    finally:
        link.stop()


def test_acl_file_content_is_pattern_based() -> None:
    assert "pattern write edgert/v1/+/devices/%u/#" in DEVICE_ACL


def test_a_socket_beyond_selects_limit_is_named(broker: Mosquitto, tmp_path: Path) -> None:
    """Found by the 1,000-device simulator: paho's select() cannot watch fd >= 1024 and reported a lost
    connection ("closed the connection before answering CONNECT"); the cause is now named."""
    import os

    SELECT_FD_LIMIT = 1024  # select() (FD_SETSIZE); the fix names it edgert.mqtt.client.SELECT_FD_LIMIT

    held = []
    try:  # occupy every free descriptor below the limit, so the MQTT socket lands above it
        while not held or held[-1] < SELECT_FD_LIMIT - 1:
            held.append(os.open(os.devnull, os.O_RDONLY))
        err = _connect_error(make_config(tmp_path, broker.port))
        assert "beyond select()'s limit of 1024" in err.message
        assert "fewer MQTT connections" in (err.hint or "")
    finally:
        for fd in held:
            os.close(fd)
