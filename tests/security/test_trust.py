"""Publisher keys and the device's trusted set: files, modes, audit, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from edgert.errors import KeyFileError
from edgert.security.audit import AuditLog, read_records
from edgert.security.keys import DeviceKeys, format_public_key
from edgert.security.trust import (
    TrustedPublishers,
    generate_publisher_key,
    load_publisher_key,
    parse_publisher_key,
    publisher_fingerprint,
    trust_dir,
    trust_publisher,
    untrust_publisher,
)


def test_keygen_writes_a_private_0600_key_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "publisher.key"
    public = generate_publisher_key(path)
    assert (path.stat().st_mode & 0o777) == 0o600 and b"PRIVATE KEY" in path.read_bytes()
    assert publisher_fingerprint(load_publisher_key(path).public_key()) == publisher_fingerprint(public)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_publisher_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="too open"):
        load_publisher_key(path)
    os.chmod(path, 0o600)
    wrong = tmp_path / "x.pem"
    wrong.write_bytes(DeviceKeys.generate().wrap.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    os.chmod(wrong, 0o600)
    with pytest.raises(KeyFileError, match="not an Ed25519 private key"):
        load_publisher_key(wrong)


def test_parse_publisher_key() -> None:
    public = DeviceKeys.generate().sign_public
    parsed = parse_publisher_key(format_public_key(public))
    assert publisher_fingerprint(parsed) == publisher_fingerprint(public)
    for bad in ("ed25519:!!", "ed25519:AAAA", format_public_key(DeviceKeys.generate().wrap_public), "hello"):
        with pytest.raises(KeyFileError):
            parse_publisher_key(bad)


def test_trust_untrust_files_modes_and_audit(state: Path, device_keys: DeviceKeys) -> None:
    a, b = DeviceKeys.generate().sign_public, DeviceKeys.generate().sign_public
    audit = AuditLog(state / "audit", device_keys.sign)
    fp_a, added = trust_publisher(state, a, audit=audit)
    assert added and trust_publisher(state, a, audit=audit) == (fp_a, False)
    assert (trust_dir(state).stat().st_mode & 0o777) == 0o700
    assert (os.stat(trust_dir(state) / f"{fp_a}.pub").st_mode & 0o777) == 0o600
    loaded = TrustedPublishers.load(state, [format_public_key(b)])
    assert fp_a in loaded and publisher_fingerprint(b) in loaded
    assert {d["source"] for d in loaded.describe()} == {"pinned", "config"}
    assert untrust_publisher(state, fp_a, audit=audit) and not untrust_publisher(state, fp_a, audit=audit)
    assert fp_a not in TrustedPublishers.load(state)
    audit.close()
    events = [(r["event"], r["data"]["fingerprint"]) for r in read_records(state / "audit")
              if r["event"].startswith("publisher_")]
    assert events == [("publisher_trusted", fp_a), ("publisher_untrusted", fp_a)]


def test_tampered_trust_files_are_refused(state: Path) -> None:
    a, b = DeviceKeys.generate().sign_public, DeviceKeys.generate().sign_public
    fp_a, _ = trust_publisher(state, a)
    path = trust_dir(state) / f"{fp_a}.pub"
    path.write_text(format_public_key(b))  # a key file whose name lies about its content
    with pytest.raises(KeyFileError, match="not the one its name says"):
        TrustedPublishers.load(state)
    path.write_text(format_public_key(a))
    os.chmod(path, 0o666)  # anyone could add trust
    with pytest.raises(KeyFileError, match="too open"):
        TrustedPublishers.load(state)


def test_keys_trust_untrust_show_cli(state: Path, tmp_path: Path) -> None:
    from edgert.cli.keys import keys

    runner = CliRunner()
    sd = ["--state-dir", str(state)]
    public = DeviceKeys.generate().sign_public
    key_file = tmp_path / "publisher.pub"
    key_file.write_text(format_public_key(public) + "\n")
    fp = publisher_fingerprint(public)
    res = runner.invoke(keys, ["trust", str(key_file), *sd])
    assert res.exit_code == 0 and f"trusting publisher {fp}" in res.output, res.output
    shown = json.loads(runner.invoke(keys, ["show", "--json", *sd]).output)
    assert shown["trusted_publishers"] == [{"fingerprint": fp, "public_key": format_public_key(public),
                                            "source": "pinned"}]
    assert fp in runner.invoke(keys, ["show", *sd]).output
    assert runner.invoke(keys, ["untrust", fp, *sd]).exit_code == 0
    res = runner.invoke(keys, ["untrust", fp, *sd])
    assert res.exit_code != 0 and "is not pinned" in str(res.exception)
    assert "trusted publishers: 0" in runner.invoke(keys, ["show", *sd]).output
    events = [r["event"] for r in read_records(state / "audit")]
    assert events.count("publisher_trusted") == 1 and events.count("publisher_untrusted") == 1
