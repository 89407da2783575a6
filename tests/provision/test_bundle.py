"""Site bundles: signed by the fleet key, verified against the key the technician trusts; endpoints."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgert.cli.provision import provision
from edgert.errors import ConfigError, SignatureError
from edgert.fleet.fleetdir import FleetDir
from edgert.fleet.repo_init import init_fleet
from edgert.provision.bundle import create_bundle, load_bundle, parse_endpoint, parse_fleet_key, write_bundle
from edgert.security.keys import format_public_key
from edgert.security.trust import generate_publisher_key


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    return init_fleet(tmp_path / "fleet", fleet_id="f1").fleet


@pytest.fixture
def bundle_path(fleet: FleetDir, tmp_path: Path) -> Path:
    ca = fleet.public_dir / "ca.pem"
    b = create_bundle(
        fleet.path,
        groups=["default"],
        lifetime=timedelta(days=2),
        uses=3,
        broker=("mqtt.example.net", 8883),
        claim_broker=("mqtt.example.net", 8884),
        broker_ca=ca,
    )
    write_bundle(b, tmp_path / "site.bundle")
    return tmp_path / "site.bundle"


def _edit(path: Path, change: object) -> None:
    doc = json.loads(path.read_text())
    change(doc)  # type: ignore[operator]
    path.write_text(json.dumps(doc))


def test_signed_bundle_verifies_with_the_fleet_key(fleet: FleetDir, bundle_path: Path) -> None:
    b = load_bundle(bundle_path, trusted=parse_fleet_key(fleet.publisher_public))
    assert (b.broker.host, b.broker.port, b.broker.tls) == ("mqtt.example.net", 8883, True)
    assert (b.claim_broker.port, b.claim_broker.tls) == (8884, True)
    assert b.broker_ca_pem == (fleet.public_dir / "ca.pem").read_text()
    # the key can also be given as a file holding it
    keyfile = bundle_path.parent / "fleet.pub"
    keyfile.write_text(fleet.publisher_public + "\n")
    assert load_bundle(bundle_path, trusted=parse_fleet_key(str(keyfile))).claim_id == b.claim_id


@pytest.mark.parametrize(
    "field",
    ["broker_port", "claim_host", "ca", "tuf_root", "groups", "claim", "publisher", "bad_publisher", "sig"],
)
def test_tampered_bundle_is_refused(fleet: FleetDir, bundle_path: Path, field: str) -> None:
    other = format_public_key(generate_publisher_key(bundle_path.parent / "evil.pem"))
    changes = {
        "broker_port": lambda d: d["broker"].update(port=18883),
        "claim_host": lambda d: d["claim_broker"].update(host="evil.example"),
        "ca": lambda d: d.update(broker_ca_pem=d["broker_ca_pem"].replace("A", "B", 1)),
        "tuf_root": lambda d: d.update(tuf_root="e30="),
        "groups": lambda d: d.update(groups=["default", "prod"]),
        "claim": lambda d: d["claim"].update(secret="x" + d["claim"]["secret"]),
        "publisher": lambda d: d.update(publisher=other),
        "bad_publisher": lambda d: d.update(publisher="ed25519:not-base64!"),
        "sig": lambda d: d.update(sig=d["sig"][:-4] + "AAA="),
    }
    _edit(bundle_path, changes[field])
    with pytest.raises(SignatureError, match="not signed by the fleet key you trust") as info:
        load_bundle(bundle_path, trusted=parse_fleet_key(fleet.publisher_public))
    assert "fresh bundle" in (info.value.hint or "")


def test_bundle_of_another_fleet_is_refused(tmp_path: Path, bundle_path: Path) -> None:
    other = init_fleet(tmp_path / "other", fleet_id="f2").fleet
    with pytest.raises(SignatureError):
        load_bundle(bundle_path, trusted=parse_fleet_key(other.publisher_public))


def test_unsigned_and_old_bundles_name_the_fix(fleet: FleetDir, bundle_path: Path) -> None:
    trusted = parse_fleet_key(fleet.publisher_public)
    _edit(bundle_path, lambda d: d.pop("sig"))
    with pytest.raises(SignatureError):
        load_bundle(bundle_path, trusted=trusted)
    _edit(bundle_path, lambda d: d.update(v=1))
    with pytest.raises(ConfigError, match="bundle format 1 is too old") as info:
        load_bundle(bundle_path, trusted=trusted)
    assert "edgert provision bundle create" in (info.value.hint or "")


def test_cli_refuses_a_tampered_bundle_before_opening_the_port(fleet: FleetDir, bundle_path: Path) -> None:
    _edit(bundle_path, lambda d: d["broker"].update(host="evil.example"))
    args = ["device", "--port", "/dev/ttyUSB-nope", "--bundle", str(bundle_path)]
    r = CliRunner().invoke(provision, [*args, "--fleet-key", fleet.publisher_public])
    assert isinstance(r.exception, SignatureError), r.output  # not the missing port: checked first
    r = CliRunner().invoke(provision, args, env={"EDGERT_FLEET_KEY": ""})
    assert r.exit_code == 2 and "--fleet-key" in r.output  # the key is required


def test_endpoint_and_key_errors_are_clear(tmp_path: Path) -> None:
    assert parse_endpoint("mqtt.example.net:8884") == ("mqtt.example.net", 8884)
    for bad in ("mqtt.example.net", ":8883", "h:99999", "h:x"):
        with pytest.raises(ConfigError, match="is not HOST:PORT"):
            parse_endpoint(bad, "--claim-broker")
    with pytest.raises(ConfigError, match="neither an 'ed25519:' key"):
        parse_fleet_key(str(tmp_path / "missing.pub"))


def test_claim_tls_needs_a_ca(fleet: FleetDir) -> None:
    with pytest.raises(ConfigError, match="no broker CA"):
        create_bundle(fleet.path, groups=["default"], lifetime=timedelta(days=1), uses=1, claim_tls=True)


def test_agent_refuses_a_format_1_bundle_with_a_hint(tmp_path: Path) -> None:
    """An older technician CLI sends a bundle without a claim endpoint: a clear refusal, nothing written."""
    from edgert.provision.agent import Agent
    from edgert.provision.session import DeviceRefusal, ErrorCode

    agent = Agent(tmp_path / "state", tmp_path / "edgert.toml")
    agent.handle("keys", {"device_id": "gw-old"})
    old = {
        "v": 1,
        "fleet": "f1",
        "broker": {"host": "h", "port": 1883, "ca_pem": None},
        "groups": ["default"],
    }
    with pytest.raises(DeviceRefusal) as info:
        agent.handle("configure", {"bundle": old})
    assert info.value.code == ErrorCode.BAD_ARGS and "format 1" in str(info.value)
    assert "upgrade edgert" in (info.value.hint or "")
    assert not (tmp_path / "edgert.toml").exists()


def test_device_with_a_pinned_fleet_key_checks_the_part_it_receives(
    fleet: FleetDir, bundle_path: Path, tmp_path: Path
) -> None:
    """configure carries the bundle without the claim, signed on its own (device_sig): a device image
    with the fleet key pinned refuses anything else, before writing anything, and audits it."""
    from edgert.provision.agent import Agent
    from edgert.provision.session import DeviceRefusal, ErrorCode
    from tests.provision.site import agent_events

    b = load_bundle(bundle_path, trusted=None)
    pinned = parse_fleet_key(fleet.publisher_public)
    other = init_fleet(tmp_path / "other", fleet_id="f1").fleet  # same id, another fleet's keys
    forged = create_bundle(other.path, groups=["default"], lifetime=timedelta(days=1), uses=1).device_public()
    tampered = {**b.device_public(), "broker": {**b.device_public()["broker"], "host": "evil.example"}}
    unsigned = {k: v for k, v in b.device_public().items() if k != "device_sig"}
    state, config = tmp_path / "state", tmp_path / "etc" / "edgert.toml"
    agent = Agent(state, config, fleet_key=pinned)
    assert agent.handle("info", {})["fleet_key"] is not None
    agent.handle("keys", {"device_id": "gw-p"})
    for doc in (tampered, forged, unsigned):
        with pytest.raises(DeviceRefusal) as info:
            agent.handle("configure", {"bundle": doc})
        assert info.value.code == ErrorCode.SECURITY and "not signed by the fleet key" in str(info.value)
        assert not config.exists() and not (state / "fleet").exists()
    assert agent_events(state).count("provision_bundle_refused") == 3
    assert agent.handle("configure", {"bundle": b.device_public()})["fleet"] == "f1"
    assert config.exists()
    # without a pinned key the device takes what the (verifying) technician sends
    assert Agent(tmp_path / "s2", tmp_path / "c2.toml").handle("info", {})["fleet_key"] is None
