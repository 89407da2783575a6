"""``edgert daemon --check`` findings over real files, sockets and key modes (no daemon started)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from edgert.config import parse_config
from edgert.device.check import ERROR, OK, SKIPPED, check_config, check_socket_path, has_errors


def _by_what(findings):  # type: ignore[no-untyped-def]
    return {f.what: f for f in findings}


def test_live_daemon_on_the_socket_is_an_error_and_a_stale_socket_is_not(tmp_path: Path) -> None:
    path = tmp_path / "edgert.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen()
    try:
        found = check_socket_path(str(path))
        assert found.status == ERROR and "live daemon answers" in found.detail
    finally:
        live.close()
    stale = check_socket_path(str(path))  # the file is still there, nobody listens
    assert stale.status == OK and "stale" in stale.detail
    (tmp_path / "plain").write_text("x")
    assert check_socket_path(str(tmp_path / "plain")).status == ERROR
    assert check_socket_path(str(tmp_path / "new" / "dir" / "s.sock")).status == OK


def test_unwritable_socket_directory_is_an_error(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    if os.access(ro, os.W_OK):  # root ignores modes; the check then rightly says ok
        assert check_socket_path(str(ro / "s.sock")).status == OK
    else:
        assert check_socket_path(str(ro / "s.sock")).status == ERROR


def test_mqtt_files_must_exist_and_secrets_must_be_private(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("ca")
    pw = tmp_path / "pw"
    pw.write_text("secret")
    pw.chmod(0o644)
    text = f"""
[socket]
path = ""
[http]
listen = ""
[metrics]
listen = ""
[mqtt]
host = "b"
fleet = "f"
device_id = "d"
ca_file = "{ca}"
username = "u"
password_file = "{pw}"
command_key_file = "{tmp_path / "missing.pub"}"
"""
    findings = _by_what(check_config(parse_config(text, "f.toml")))
    assert findings["mqtt.ca_file"].status == OK
    assert (
        findings["mqtt.password_file"].status == ERROR
        and "chmod 600" in findings["mqtt.password_file"].hint
    )
    assert findings["mqtt.command_key_file"].status == ERROR
    assert "missing.pub" in findings["mqtt.command_key_file"].detail
    pw.chmod(0o600)
    assert _by_what(check_config(parse_config(text, "f.toml")))["mqtt.password_file"].status == OK


def test_no_state_dir_skips_keys_when_no_store_model_needs_them(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"onnx")
    base = f'[daemon]\nstate_dir = "{tmp_path / "none"}"\nallow_plaintext = true\n'
    plain = parse_config(base + f'[[models]]\nname = "m"\npath = "{model}"\n', "f.toml")
    found = _by_what(check_config(plain))
    assert found["keys"].status == SKIPPED and "does not exist" in found["keys"].detail
    assert "edgert keys init" in found["keys"].hint
    assert found["model m"].status == OK
    stored = parse_config(base + '[[models]]\nname = "s"\n', "f.toml")
    found = _by_what(check_config(stored))
    assert found["keys"].status == ERROR and found["model s"].status == SKIPPED
    gone = parse_config(base + f'[[models]]\nname = "m"\npath = "{tmp_path / "gone.onnx"}"\n', "f.toml")
    assert _by_what(check_config(gone))["model m"].status == ERROR


def test_json_output_lists_every_finding(tmp_path: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(
        f'[daemon]\nprofile = "nope"\nstate_dir = "{tmp_path}"\n[http]\nlisten = ""\n[metrics]\nlisten = ""\n'
        '[socket]\npath = ""\n'
    )
    r = edgert_cli("daemon", "--check", "--json", "-c", str(cfg))
    assert r.returncode == 2
    findings = json.loads(r.stdout)
    assert {"what", "status", "detail", "hint"} <= set(findings[0])
    profile = next(f for f in findings if f["what"] == "profile")
    assert profile["status"] == "error" and "cpu-generic" in profile["detail"]
    assert has_errors([]) is False
