"""Issue 8 item 3 end to end with the real CLI: a fleet package installs only from a pinned publisher.

Before, anyone holding the device's public key (meant to be shared) could build a package that the
device installed and activated. Pinning works from the state (`edgert keys trust`) or the daemon config.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.device.subproc import MODELS, cli


def _ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_only_pinned_publishers_install(tmp_path: Path) -> None:
    st = str(tmp_path / "state")
    _ok("keys", "init", "--state-dir", st)
    device = json.loads(_ok("keys", "show", "--json", "--state-dir", st))
    recipient = device["wrap_public_key"]
    fleet_pub = _ok("package", "keygen", "-o", str(tmp_path / "fleet.key")).strip()
    mallory_pub = _ok("package", "keygen", "-o", str(tmp_path / "mallory.key")).strip()
    assert fleet_pub.startswith("ed25519:") and mallory_pub.startswith("ed25519:")
    pkgs = {}
    for who, version in (("fleet", "1"), ("mallory", "2")):
        pkgs[who] = tmp_path / f"{who}.edgepkg"
        _ok("package", "create", str(MODELS / "digits_small_int8.onnx"), "--name", "digits",
            "--version", version, "--publisher-key", str(tmp_path / f"{who}.key"), "--recipient", recipient,
            "-o", str(pkgs[who]))
    inspected = json.loads(_ok("package", "inspect", str(pkgs["mallory"]), "--json", "--trust", fleet_pub))
    assert inspected["signature"]["verifies"] is True and inspected["signature"]["trusted"] is False

    # nothing pinned: refused with the fix in the hint, nothing installed
    r = cli("models", "import", "--package", str(pkgs["fleet"]), "--state-dir", st,
            "--socket", str(tmp_path / "none"))
    assert r.returncode == 17, r.stderr
    assert "does not trust" in r.stderr and "edgert keys trust" in r.stderr

    # pinned by the daemon config: the fleet's package installs and is served (offline Deployer)
    config = tmp_path / "edgert.toml"
    config.write_text(f'[daemon]\nprofile = "cpu-generic"\nstate_dir = "{st}"\n'
                      f'[socket]\npath = "{tmp_path / "none.sock"}"\n'
                      f'[security]\ntrusted_publishers = ["{fleet_pub}"]\n')
    out = _ok("models", "import", "--package", str(pkgs["fleet"]), "--config", str(config))
    assert "passed its health check" in out
    # a package built by someone else who only knows the device's public key: still refused
    r = cli("models", "import", "--package", str(pkgs["mallory"]), "--config", str(config))
    assert r.returncode == 17 and "does not trust" in r.stderr
    listed = json.loads(_ok("models", "list", "--json", "--config", str(config)))
    assert [(e["name"], e["active"], e["installed"]) for e in listed] == [("digits", "1", ["1"])]

    # pinned in the state directory instead
    _ok("keys", "trust", mallory_pub, "--state-dir", st)
    _ok("models", "import", "--package", str(pkgs["mallory"]), "--state-dir", st,
        "--socket", str(tmp_path / "n"))
    records = (tmp_path / "state" / "audit").glob("audit-*.jsonl")
    events = [json.loads(line)["event"] for f in records for line in f.read_text().splitlines()]
    assert "package_refused" in events and "publisher_trusted" in events
