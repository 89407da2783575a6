"""Issue 8 item 6: a config with several mistakes reports every one of them, not only the first.

Before: parsing stopped at the first problem, so fixing a config took one daemon restart per typo.
"""

from __future__ import annotations

from pathlib import Path

BAD = """
[daemon]
log_level = "loud"

[http]
listen = "nowhere"

[[models]]
name = "digits"
nan_policy = "maybe"

[mqtt]
host = "broker"
fleet = "f"
device_id = "d"
protocol = "4"
"""


def test_every_error_is_reported_with_file_key_and_allowed_values(tmp_path: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(BAD)
    r = edgert_cli("daemon", "--check", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [ln for ln in r.stdout.splitlines() if ln.startswith("error")]
    assert len(errors) == 4, r.stdout
    expected = {
        "daemon.log_level": "allowed: debug, info, warning, error",
        "http.listen": "allowed: HOST:PORT",
        "models[0].nan_policy": "allowed: allow, reject",
        "mqtt.protocol": "allowed: 5, 3.1.1",
    }
    for key, allowed in expected.items():
        line = next((ln for ln in errors if f"{cfg}: {key}: " in ln), None)
        assert line is not None, (key, r.stdout)
        assert allowed in line


def test_serving_refuses_with_one_message_listing_all(tmp_path: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(BAD.split("[mqtt]")[0])  # three mistakes in three tables
    r = edgert_cli("daemon", "-c", str(cfg))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert lines[0] == f"error: 3 errors in {cfg}:"
    assert [ln.strip().split(": ")[1] for ln in lines[1:4]] == [
        "daemon.log_level",
        "http.listen",
        "models[0].nan_policy",
    ]
