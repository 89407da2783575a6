"""The shipped unit file is hardened, runs the packaged daemon as the edgert user, and passes
systemd-analyze verify (when systemd is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

#: What the Debian package (tools/build_deb.sh) installs and the unit must therefore name.
PACKAGED_EXEC = "/opt/edgert/bin/edgert"


def test_unit_is_hardened(repo_root):
    text = (repo_root / "packaging" / "edgert.service").read_text()
    for line in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=edgert",
        "RuntimeDirectory=edgert",
        "WatchdogSec=",
        "ExecReload=",
    ):
        assert line in text
    assert "PrivateNetwork" not in text  # would break MQTT
    assert "AF_INET" in text


def test_unit_runs_the_packaged_daemon_as_the_edgert_user(repo_root):
    unit = (repo_root / "packaging" / "edgert.service").read_text().splitlines()
    assert f"ExecStart={PACKAGED_EXEC} daemon -c /etc/edgert/edgert.toml" in unit
    # A fixed user, so `sudo -u edgert edgert …` (README) works on the daemon's own state.
    assert "User=edgert" in unit and "Group=edgert" in unit
    assert not any(line.startswith("DynamicUser=") for line in unit)
    sysusers = (repo_root / "packaging" / "sysusers.d" / "edgert.conf").read_text().splitlines()
    assert 'u edgert - "edgert inference daemon" /var/lib/edgert' in sysusers
    tmpfiles = (repo_root / "packaging" / "tmpfiles.d" / "edgert.conf").read_text().splitlines()
    assert "d /var/lib/edgert 0700 edgert edgert -" in tmpfiles


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(repo_root, tmp_path):
    # verify needs ExecStart to exist here; point it at a binary that does, keep everything else.
    # tests/packaging/test_deb.py verifies the installed unit with the real /opt/edgert/bin/edgert.
    unit = (repo_root / "packaging" / "edgert.service").read_text()
    exe = shutil.which("true")
    assert exe and PACKAGED_EXEC in unit
    path = tmp_path / "edgert.service"
    path.write_text(unit.replace(PACKAGED_EXEC, exe))
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown key" not in proc.stderr and "Unknown lvalue" not in proc.stderr, proc.stderr
