"""The provisioning agent's unit: a template per serial port, hardened, running the packaged CLI as the
daemon's user, skipped once the device is provisioned; passes systemd-analyze verify when installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edgert.provision.agent import LOCKED_MARKER

#: What the Debian package (tools/build_deb.sh) installs and the unit must therefore name.
PACKAGED_EXEC = "/opt/edgert/bin/edgert"
UNIT = "edgert-provision@.service"


def _unit(repo_root: Path) -> list[str]:
    return (repo_root / "packaging" / UNIT).read_text().splitlines()


def test_unit_runs_the_agent_on_the_instance_port_as_the_daemon_user(repo_root: Path) -> None:
    unit = _unit(repo_root)
    assert (
        f"ExecStart={PACKAGED_EXEC} provision agent --port /dev/%I --baud 115200 "
        "--state-dir /var/lib/edgert --config /etc/edgert/edgert.toml"
    ) in unit
    # the daemon unit reads the same config as the same user
    daemon = (repo_root / "packaging" / "edgert.service").read_text().splitlines()
    assert f"ExecStart={PACKAGED_EXEC} daemon -c /etc/edgert/edgert.toml" in daemon
    for line in ("User=edgert", "Group=edgert", "SupplementaryGroups=dialout", "DeviceAllow=/dev/%I rw"):
        assert line in unit
    assert "Conflicts=serial-getty@%i.service" in unit
    assert "EnvironmentFile=-/etc/default/edgert-provision" in unit  # EDGERT_FLEET_KEY, read by the agent


def test_unit_is_skipped_once_provisioned(repo_root: Path, tmp_path: Path) -> None:
    """The unit's condition names the marker the agent writes on finish (and factory reset removes)."""
    from edgert.provision.agent import Agent, factory_reset

    assert f"ConditionPathExists=!/var/lib/edgert/provision/{LOCKED_MARKER}" in _unit(repo_root)
    agent = Agent(tmp_path / "state", tmp_path / "edgert.toml")
    marker = tmp_path / "state" / "provision" / LOCKED_MARKER
    agent.handle("keys", {"device_id": "gw-u"})
    agent.handle("configure", {"bundle": _public_bundle(tmp_path)})
    assert not marker.exists()
    agent.handle("finish", {})
    assert marker.exists() and oct(marker.stat().st_mode & 0o777) == "0o600"
    factory_reset(tmp_path / "state", tmp_path / "edgert.toml")
    assert not marker.exists()


def test_unit_is_hardened(repo_root: Path) -> None:
    text = "\n".join(_unit(repo_root))
    for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/etc/edgert",
                 "DevicePolicy=closed", "CapabilityBoundingSet=", "StateDirectory=edgert"):  # fmt: skip
        assert line in text
    assert "PrivateNetwork" not in text and "AF_INET" in text  # enrollment needs MQTT


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(repo_root: Path, tmp_path: Path) -> None:
    # verify needs ExecStart to exist here; point it at a binary that does, keep everything else.
    text = (repo_root / "packaging" / UNIT).read_text()
    exe = shutil.which("true")
    assert exe and PACKAGED_EXEC in text
    for name in (UNIT, "edgert-provision@ttyS0.service"):  # the template and an instance
        path = tmp_path / name
        path.write_text(text.replace(PACKAGED_EXEC, exe))
        proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert "Unknown key" not in proc.stderr and "Unknown lvalue" not in proc.stderr, proc.stderr


def _public_bundle(tmp: Path) -> dict[str, object]:
    from datetime import timedelta

    from edgert.fleet.repo_init import init_fleet
    from edgert.provision.bundle import create_bundle

    init_fleet(tmp / "fleet", fleet_id="f1")
    return create_bundle(
        tmp / "fleet", groups=["default"], lifetime=timedelta(days=1), uses=1
    ).device_public()
