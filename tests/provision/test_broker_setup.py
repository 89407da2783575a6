"""`edgert provision broker-setup`: what the operator puts on the broker (the site tests run on it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgert.cli.provision import provision
from edgert.errors import EdgertError, KeyFileError
from edgert.fleet.repo_init import init_fleet
from edgert.mqtt.topics import check_id
from edgert.provision.broker_conf import controller_identity


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_broker_setup_writes_listeners_certs_and_acls(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "acme", fleet_id="acme").fleet
    out = tmp_path / "broker"
    args = ["broker-setup", "--fleet", str(fleet.path), "--host", "mqtt.example.net", "--host", "10.0.0.5",
            "--install-dir", "/etc/mosquitto/edgert", "-o", str(out), "--json"]  # fmt: skip
    r = CliRunner().invoke(provision, args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    conf = (out / "mosquitto.conf").read_text()
    assert conf.startswith("per_listener_settings true\n")
    device, claim = conf.split("\nlistener ")[1:]
    assert device.startswith("8883\n") and "require_certificate true" in device
    assert "use_identity_as_username true" in device and "cafile /etc/mosquitto/edgert/fleet-ca.pem" in device
    assert "acl_file /etc/mosquitto/edgert/devices.acl" in device and "password_file" not in device
    assert claim.startswith("8884\n") and "password_file /etc/mosquitto/edgert/claims.passwd" in claim
    assert "require_certificate" not in claim and "certfile /etc/mosquitto/edgert/broker.crt" in claim
    assert (out / "claims.acl").read_text() == (
        "pattern write edgert/v1/acme/enroll/%u/request\npattern read edgert/v1/acme/enroll/%u/reply\n"
    )
    assert (
        "user edgert-controller@acme\ntopic readwrite edgert/v1/acme/#" in (out / "devices.acl").read_text()
    )
    # the certificates come from the fleet CA; the server's names are the hosts given
    ca = _cert(fleet.ca_cert_path)
    server = _cert(out / "broker.crt")
    assert (
        server.issuer == ca.subject and (out / "fleet-ca.pem").read_bytes() == fleet.ca_cert_path.read_bytes()
    )
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["mqtt.example.net"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    ctl = _cert(Path(doc["fleet_toml_broker"]["cert_file"]))
    assert ctl.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "edgert-controller@acme"
    eku = ctl.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for key in (out / "broker.key", out / "controller" / "controller.key", out / "claims.passwd"):
        assert oct(key.stat().st_mode & 0o777) == "0o600", key
    # never over an existing setup
    r = CliRunner().invoke(provision, args)
    assert isinstance(r.exception, KeyFileError) and "never overwritten" in (r.exception.hint or "")


def test_no_device_can_be_named_like_the_controller() -> None:
    """Enrollment names the certificate after the device id; the controller's name is not a valid one."""
    with pytest.raises(EdgertError):
        check_id(controller_identity("acme"), "device id")


def test_password_lines_are_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    """Recompute a line mosquitto_passwd wrote, with its salt: the same (the site tests log in with ours)."""
    import base64
    import shutil
    import subprocess

    from edgert.provision.broker_conf import mosquitto_password_line

    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    pw = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(pw), "claim-abc", "s3cret"], check=True, capture_output=True)
    line = pw.read_text().strip()
    salt = base64.b64decode(line.split("$")[3])
    assert mosquitto_password_line("claim-abc", "s3cret", salt=salt) == line
    assert mosquitto_password_line("claim-abc", "other", salt=salt) != line


def test_claim_passwords_follow_bundle_create_and_revoke(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "acme", fleet_id="acme").fleet
    pw = tmp_path / "claims.passwd"
    made = []
    for _ in range(2):
        out = tmp_path / f"site{len(made)}.bundle"
        args = ["bundle", "create", "--fleet", str(fleet.path), "--groups", "default",
                "--claim-passwords", str(pw), "-o", str(out), "--json"]  # fmt: skip
        r = CliRunner().invoke(provision, args)
        assert r.exit_code == 0, r.output
        made.append(json.loads(r.output)["claim"])
    users = [line.split(":")[0] for line in pw.read_text().splitlines()]
    assert users == made and oct(pw.stat().st_mode & 0o777) == "0o600"
    assert all(json.loads((tmp_path / f"site{i}.bundle").read_text())["claim"]["secret"] not in pw.read_text()
               for i in range(2))  # fmt: skip
    r = CliRunner().invoke(provision, ["claims", "revoke", "--fleet", str(fleet.path), made[0],
                                       "--claim-passwords", str(pw)])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert [line.split(":")[0] for line in pw.read_text().splitlines()] == [made[1]]
