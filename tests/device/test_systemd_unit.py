"""The shipped unit file is hardened and passes systemd-analyze verify (when systemd is installed)."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def test_unit_is_hardened(repo_root):
    text = (repo_root / "packaging" / "edgert.service").read_text()
    for line in (
        "Type=notify",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=edgert",
        "RuntimeDirectory=edgert",
        "DynamicUser=yes",
        "WatchdogSec=",
        "ExecReload=",
    ):
        assert line in text
    assert "PrivateNetwork" not in text  # would break MQTT
    assert "AF_INET" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(repo_root, tmp_path):
    # verify needs ExecStart to exist here; point it at a binary that does, keep everything else.
    unit = (repo_root / "packaging" / "edgert.service").read_text()
    exe = shutil.which("true")
    assert exe
    path = tmp_path / "edgert.service"
    path.write_text(unit.replace("/usr/local/bin/edgert", exe))
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Unknown key" not in proc.stderr and "Unknown lvalue" not in proc.stderr, proc.stderr
