"""The security CLI end to end, as a user runs it (real subprocesses, real files)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_edgert
from tests.security.kit import SMALL_ONNX, SMALL_TFLITE


@pytest.mark.integration
def test_keys_package_store_audit_capture(tmp_path: Path) -> None:
    env = {"EDGERT_STATE_DIR": str(tmp_path / "state")}
    r = run_edgert("keys", "init", env=env)
    assert r.returncode == 0, r.stderr
    again = run_edgert("keys", "init", env=env)
    assert again.returncode == 7 and "already exist" in again.stderr
    show = run_edgert("keys", "show", "--json", env=env)
    summary = json.loads(show.stdout)
    assert "PRIVATE" not in show.stdout and summary["wrap_public_key"].startswith("x25519:")

    publisher = tmp_path / "publisher.key"
    r = run_edgert("package", "keygen", "-o", str(publisher))
    assert r.returncode == 0, r.stderr
    publisher_pub = r.stdout.strip()
    assert publisher_pub.startswith("ed25519:") and (publisher.stat().st_mode & 0o777) == 0o600
    pkg = tmp_path / "digits-2.edgepkg"
    r = run_edgert("package", "create", str(SMALL_ONNX), f"{SMALL_TFLITE}:int8-tflite", "--name", "digits",
                   "--version", "2", "--publisher-key", str(publisher), "--recipient",
                   summary["wrap_public_key"], "-o", str(pkg), env=env)
    assert r.returncode == 0, r.stderr
    inspect = json.loads(run_edgert("package", "inspect", str(pkg), "--json").stdout)
    assert inspect["manifest"]["name"] == "digits"
    assert [(v["variant"], v["format"]) for v in inspect["variants"]] == [("int8", "onnx"),
                                                                         ("int8-tflite", "tflite")]
    assert inspect["variants"][0]["inputs"][0]["name"] == "pixels"
    assert inspect["signature"]["verifies"] is True and "trusted" not in inspect["signature"]
    assert inspect["recipients"] == [{"recipient": summary["wrap_fingerprint"],
                                      "suite": "HPKE-X25519-HKDF_SHA256-AES_256_GCM"}]

    from click.testing import CliRunner

    from edgert.cli import store_cmds  # the lead attaches these to 'edgert models'; run them directly here

    runner = CliRunner()
    sd = ["--state-dir", str(tmp_path / "state")]
    res = runner.invoke(store_cmds.import_cmd, [str(pkg), *sd])  # publisher not trusted yet
    assert res.exit_code != 0 and "does not trust" in str(res.exception)
    assert not (tmp_path / "state" / "models" / "packages" / "digits").exists()
    r = run_edgert("keys", "trust", publisher_pub, env=env)
    assert r.returncode == 0 and "trusting publisher" in r.stdout, r.stderr
    assert inspect["signature"]["signer"] in run_edgert("keys", "show", env=env).stdout
    assert runner.invoke(store_cmds.import_cmd, [str(pkg), *sd]).exit_code == 0
    src = tmp_path / "byo.onnx"
    src.write_bytes(SMALL_ONNX.read_bytes())
    args = [str(src), "--name", "digits", "--version", "1", "--shred", *sd]
    res = runner.invoke(store_cmds.import_cmd, args)
    assert res.exit_code != 0 and "anti-rollback" in str(res.exception)
    assert src.exists()  # refused import loses nothing
    res = runner.invoke(store_cmds.import_cmd, [str(src), "--name", "byo", "--shred", *sd])
    assert res.exit_code == 0, res.output
    assert not src.exists()
    listing = json.loads(runner.invoke(store_cmds.list_cmd, ["--json", *sd]).output)
    assert {e["name"]: e["active"] for e in listing} == {"byo": "1", "digits": "2"}

    r = run_edgert("audit", "verify", env=env)
    assert r.returncode == 0 and "audit log ok" in r.stdout, r.stderr
    tail = run_edgert("audit", "tail", "-n", "50", env=env).stdout
    assert "model_install" in tail and "keys_created" in tail and "model_install_refused" in tail
    assert "package_refused" in tail and "publisher_trusted" in tail
    log = sorted((tmp_path / "state" / "audit").glob("audit-*.jsonl"))[0]
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:2] + lines[3:]))
    r = run_edgert("audit", "verify", env=env)
    assert r.returncode == 6 and "broken at record 2" in r.stderr

    fleet = tmp_path / "fleet.pem"
    pub = run_edgert("capture", "keygen", str(fleet)).stdout.strip()
    assert pub.startswith("x25519:") and (fleet.stat().st_mode & 0o777) == 0o600
    r = run_edgert("capture", "enable", "digits", "--rate", "0.5", "--max-mb", "1", "--fleet-key", pub,
                   env=env)
    assert r.returncode == 0, r.stderr


@pytest.mark.integration
def test_loose_key_permissions_give_a_clear_error(tmp_path: Path) -> None:
    env = {"EDGERT_STATE_DIR": str(tmp_path / "state")}
    assert run_edgert("keys", "init", env=env).returncode == 0
    os.chmod(tmp_path / "state" / "keys" / "x25519.pem", 0o644)
    r = run_edgert("keys", "show", env=env)
    assert r.returncode == 7
    assert "too open" in r.stderr and "hint: run: chmod 600" in r.stderr and "Traceback" not in r.stderr


def test_package_inspect_tells_what_is_wrong(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edgert.cli.package import package
    from edgert.errors import exit_code_for
    from edgert.security.keys import DeviceKeys, fingerprint, format_public_key
    from tests.security.kit import PUBLISHER, make_package

    runner = CliRunner()
    res = runner.invoke(package, ["inspect", str(SMALL_ONNX)])  # issue 9 F19: a model, not a package
    assert res.exit_code != 0 and exit_code_for(res.exception) == 3
    assert str(res.exception).startswith(f"{SMALL_ONNX} is not an edgert package (no EDGEPKG header)")
    device = DeviceKeys.generate()
    pkg = tmp_path / "p.edgepkg"
    pkg.write_bytes(make_package(SMALL_ONNX, [device]))
    fp = fingerprint(PUBLISHER.public_key())
    doc = json.loads(runner.invoke(package, ["inspect", str(pkg), "--json", "--trust",
                                             format_public_key(PUBLISHER.public_key())]).output)
    assert doc["signature"] == {"present": True, "signer": fp, "verifies": True, "trusted": True}
    other = format_public_key(ed25519.Ed25519PrivateKey.generate().public_key())
    text = runner.invoke(package, ["inspect", str(pkg), "--trust", other]).output
    assert f"signer: {fp}; signature verifies; signer is NOT among the given keys" in text
    assert "variant int8: onnx" in text and f"recipient {device.wrap_fingerprint}" in text
    damaged = bytearray(pkg.read_bytes())
    damaged[30] ^= 0x01  # inside the header
    pkg.write_bytes(bytes(damaged))
    res = runner.invoke(package, ["inspect", str(pkg)])
    assert exit_code_for(res.exception) == 6 and "integrity check failed" in str(res.exception)
