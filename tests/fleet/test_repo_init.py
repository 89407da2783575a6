"""``edgert fleet init`` : file modes, valid metadata, keys the device side loads, the CA, the CLI."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from edgert.errors import ConfigError, KeyFileError, SecurityError
from edgert.fleet.ca import sign_device_csr
from edgert.fleet.fleetdir import FleetDir, add_device, parse_expires
from edgert.fleet.repo_init import init_fleet
from edgert.fleet.repository import TufRepository
from edgert.mqtt.signing import load_public_key
from edgert.security.keys import DeviceKeys, format_public_key, load_private_key_file
from edgert.security.trust import load_publisher_key, parse_publisher_key


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_makes_private_keys_0600_in_a_0700_dir_and_valid_metadata(tmp_path: Path) -> None:
    made = init_fleet(tmp_path / "f", fleet_id="f1", root_keys=3, root_threshold=2,
                      expires=parse_expires("timestamp=6h"))
    fleet = made.fleet
    assert _mode(fleet.keys_dir) == 0o700
    key_files = sorted(fleet.keys_dir.iterdir())
    names = {p.name for p in key_files}
    assert {"publisher.pem", "command.pem", "capture.pem", "escrow.pem", "ca.key.pem", "ca.pem"} <= names
    assert sum(n.startswith("root-") for n in names) == 3
    assert all(any(n.startswith(f"{r}-") for n in names) for r in ("targets", "snapshot", "timestamp"))
    assert {p.name: _mode(p) for p in key_files} == {p.name: 0o600 for p in key_files}
    assert _mode(fleet.devices_dir) == 0o700
    # Valid metadata, consistent snapshots, signed by the keys root names, with the thresholds asked.
    md = fleet.metadata_dir
    assert sorted(p.name for p in md.iterdir()) == ["1.root.json", "1.snapshot.json", "1.targets.json",
                                                   "timestamp.json"]
    root_md = Metadata[Root].from_file(str(md / "1.root.json"))
    root = root_md.signed
    assert root.consistent_snapshot and root.roles["root"].threshold == 2
    assert len(root.roles["root"].keyids) == 3
    root.verify_delegate("root", root_md.signed_bytes, root_md.signatures)
    for role, cls in (("targets", Targets), ("snapshot", Snapshot), ("timestamp", Timestamp)):
        name = "timestamp.json" if role == "timestamp" else f"1.{role}.json"
        role_md = Metadata.from_file(str(md / name))
        assert isinstance(role_md.signed, cls)
        root.verify_delegate(role, role_md.signed_bytes, role_md.signatures)
    ts = Metadata.from_file(str(md / "timestamp.json")).signed
    hours = (ts.expires - datetime.now(timezone.utc)).total_seconds() / 3600
    assert 5 < hours <= 6
    # The public halves are what the device side loads, in its formats.
    assert load_public_key(fleet.command_public_key_path) is not None  # [mqtt] command_key_file
    publisher = load_publisher_key(fleet.publisher_key_path).public_key()
    assert parse_publisher_key(fleet.publisher_public) == publisher
    capture = load_private_key_file(fleet.capture_key_path)
    assert isinstance(capture, x25519.X25519PrivateKey)
    assert fleet.capture_public == format_public_key(capture.public_key())
    assert FleetDir.open(fleet.path).id == "f1" and fleet.broker.host == "127.0.0.1"


def test_init_prints_public_keys_never_private_ones(tmp_path: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    proc = edgert_cli("fleet", "init", str(tmp_path / "f"), "--id", "f2", "--root-keys", "2",
                      "--root-threshold", "2", "--expires", "root=30d,timestamp=2h")
    assert proc.returncode == 0, proc.stderr
    fleet = FleetDir.open(tmp_path / "f")
    assert fleet.publisher_public in proc.stdout and "offline" in proc.stdout
    for p in fleet.keys_dir.iterdir():
        if p.name == "ca.pem":
            continue
        body = "".join(p.read_text().splitlines()[1:-1])
        assert body[:40] not in proc.stdout + proc.stderr, p.name
    again = edgert_cli("fleet", "init", str(tmp_path / "f"))
    assert again.returncode == 2 and "not an empty directory" in again.stderr


def test_cli_devices_model_add_list_and_rotate(tmp_path: Path, edgert_cli, repo_root: Path) -> None:  # type: ignore[no-untyped-def]
    fdir = str(tmp_path / "f")
    assert edgert_cli("fleet", "init", fdir, "--id", "f3").returncode == 0
    key = format_public_key(DeviceKeys.generate().wrap_public)
    add = edgert_cli("fleet", "devices", "add", "d1", "--fleet", fdir, "--groups", "lab,prod",
                     "--x25519", key)
    assert add.returncode == 0, add.stderr
    listed = edgert_cli("fleet", "devices", "list", "--fleet", fdir, "--json")
    assert json.loads(listed.stdout)[0]["groups"] == ["lab", "prod"]
    models = repo_root / "models"
    added = edgert_cli("fleet", "model", "add", str(models / "digits_small_int8.onnx"),
                       str(models / "digits_small_int8.tflite"), "--fleet", fdir, "--name", "digits",
                       "--version", "1.2", "--groups", "lab", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["target"] == "models/digits/1.2.edgepkg"
    dup = edgert_cli("fleet", "model", "add", str(models / "digits_small_int8.onnx"), "--fleet", fdir,
                     "--name", "digits", "--version", "1.2")
    assert dup.returncode == 2 and "already published" in dup.stderr
    listed = edgert_cli("fleet", "model", "list", "--fleet", fdir)
    assert "digits 1.2: models/digits/1.2.edgepkg" in listed.stdout
    rot = edgert_cli("fleet", "keys", "rotate", "targets", "--fleet", fdir)
    assert rot.returncode == 0 and "root version 2" in rot.stdout, rot.stderr


def test_rotate_needs_the_offline_root_keys(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", fleet_id="f4").fleet
    offline = tmp_path / "usb"
    offline.mkdir(mode=0o700)
    for p in TufRepository(fleet).offline_root_files():
        p.rename(offline / p.name)
    with pytest.raises(KeyFileError, match="root key"):
        TufRepository(fleet).rotate("timestamp")
    assert TufRepository(fleet, root_key_dirs=[offline]).rotate("timestamp").root_version == 2


def test_add_model_refuses_a_package_from_another_publisher(tmp_path: Path, repo_root: Path) -> None:
    from edgert.fleet.repo_models import add_model

    a = init_fleet(tmp_path / "a", fleet_id="a").fleet
    b = init_fleet(tmp_path / "b", fleet_id="b").fleet
    target = add_model(a, [repo_root / "models/digits_small_int8.onnx"], name="digits", version="1")
    package = TufRepository(a).target_file(target.target)
    with pytest.raises(KeyFileError, match="not by this fleet's"):
        add_model(b, package=package)


def test_ca_signs_a_device_csr_with_the_fleet_chosen_name(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", fleet_id="f5").fleet
    keys = DeviceKeys.generate()
    pem = sign_device_csr(fleet.ca_key_path, fleet.ca_cert_path, keys.tls_csr("whatever"), "dev-7")
    cert = x509.load_pem_x509_certificate(pem)
    ca = x509.load_pem_x509_certificate(fleet.ca_cert_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.rfc4514_string() == "CN=dev-7"
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key() == keys.tls.public_key()
    with pytest.raises(SecurityError):
        sign_device_csr(fleet.ca_key_path, fleet.ca_cert_path, b"not a csr", "dev-7")


def test_bad_input_is_named(tmp_path: Path) -> None:
    fleet = init_fleet(tmp_path / "f", fleet_id="f6").fleet
    with pytest.raises(ConfigError, match="expiry"):
        parse_expires("root=0d")
    with pytest.raises(ConfigError, match="ROLE"):
        parse_expires("mirror=1d")
    with pytest.raises(KeyFileError):
        add_device(fleet, "d1", groups=["lab"], x25519="x25519:bad")
    with pytest.raises(ConfigError, match="not a fleet directory"):
        FleetDir.open(tmp_path)
    (fleet.path / "fleet.toml").write_text('[fleet]\nid = "f6"\n[broker]\nhost = "h"\nprot = 1\n')
    with pytest.raises(ConfigError, match="prot"):
        FleetDir.open(fleet.path)


def _refresh_many(path: str, n: int) -> None:
    repo = TufRepository(FleetDir.open(path))
    for _ in range(n):
        repo.refresh_snapshot()


def test_concurrent_writers_are_serialised(tmp_path: Path) -> None:
    import multiprocessing

    fleet = init_fleet(tmp_path / "f", fleet_id="f7").fleet
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_refresh_many, args=(str(fleet.path), 8)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    repo = TufRepository(fleet)
    assert repo.latest_version("snapshot") == 1 + 3 * 8
    assert repo.latest_version("timestamp") == 1 + 3 * 8
