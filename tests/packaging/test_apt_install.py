"""Issue 9 #22: installing test dependencies leaves the machine's services as it found them.

tools/test.sh installs Debian's rabbitmq-server and mosquitto, whose maintainer scripts enable them at
boot and start them. tools/apt_install.sh (which test.sh uses) must keep them from starting and undo
the boot-time enablement. A tiny package built here behaves exactly like those (dh-style postinst:
deb-systemd-helper enable, update-rc.d defaults, invoke-rc.d start) and is installed through the
real script with the real apt-get and dpkg. Needs root (CI runs as root).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a Debian package: needs root (CI runs as root)"),
]

REPO = Path(__file__).resolve().parents[2]
NAME = "edgert-test-dummy-svc"
POLICY = Path("/usr/sbin/policy-rc.d")
POLICY_SEEN = Path(f"/run/{NAME}.policy")
STARTED = Path(f"/run/{NAME}.started")
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}

POSTINST = f"""#!/bin/sh
# What dh_installsystemd and dh_installinit generate, plus a record of what policy-rc.d said.
set -e
if [ "$1" = configure ]; then
    deb-systemd-helper unmask {NAME}.service >/dev/null || true
    if deb-systemd-helper --quiet was-enabled {NAME}.service; then
        deb-systemd-helper enable {NAME}.service >/dev/null || true
    else
        deb-systemd-helper update-state {NAME}.service >/dev/null || true
    fi
    update-rc.d {NAME} defaults >/dev/null
    rc=0; [ -x /usr/sbin/policy-rc.d ] && {{ /usr/sbin/policy-rc.d {NAME} start || rc=$?; }} || rc=none
    echo "$rc" > {POLICY_SEEN}
    invoke-rc.d {NAME} start || true
fi
exit 0
"""
POSTRM = f"""#!/bin/sh
set -e
if [ "$1" = purge ]; then
    update-rc.d {NAME} remove >/dev/null || true
    deb-systemd-helper purge {NAME}.service >/dev/null || true
    rm -f {POLICY_SEEN} {STARTED}
fi
exit 0
"""
INIT = f"""#!/bin/sh
### BEGIN INIT INFO
# Provides:          {NAME}
# Required-Start:    $remote_fs
# Required-Stop:     $remote_fs
# Default-Start:     2 3 4 5
# Default-Stop:      0 1 6
# Short-Description: edgert test dummy service
### END INIT INFO
case "$1" in start) touch {STARTED} ;; esac
exit 0
"""
UNIT = f"""[Unit]
Description=edgert test dummy service

[Service]
ExecStart=/bin/sh -c 'touch {STARTED}'

[Install]
WantedBy=multi-user.target
"""


def enablement_links() -> set[str]:
    """systemd *.wants/*.requires links and /etc/rc?.d S links: what starts at boot."""
    links = {str(p) for p in Path("/etc/systemd/system").glob("*.wants/*")}
    links |= {str(p) for p in Path("/etc/systemd/system").glob("*.requires/*")}
    links |= {str(p) for p in Path("/etc").glob("rc?.d/S*")}
    return links


def policy_state() -> tuple[bytes, int] | None:
    return (POLICY.read_bytes(), POLICY.stat().st_mode) if POLICY.exists() else None


@pytest.fixture
def dummy_deb(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {NAME}\nVersion: 1.0\nArchitecture: all\nMaintainer: edgert tests <t@example.invalid>\n"
        "Description: a service that enables and starts itself like rabbitmq-server does\n"
    )
    for name, text in (("postinst", POSTINST), ("postrm", POSTRM)):
        (root / "DEBIAN" / name).write_text(text)
        (root / "DEBIAN" / name).chmod(0o755)
    init = root / "etc" / "init.d" / NAME
    init.parent.mkdir(parents=True)
    init.write_text(INIT)
    init.chmod(0o755)
    unit = root / "lib" / "systemd" / "system" / f"{NAME}.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(UNIT)
    (root / "DEBIAN").chmod(0o755)
    deb = tmp_path / f"{NAME}_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True,
                   capture_output=True)  # fmt: skip
    yield deb
    subprocess.run(["dpkg", "--purge", NAME], capture_output=True, env=ENV)


def test_installed_service_is_neither_started_nor_enabled(dummy_deb: Path) -> None:
    links_before, policy_before = enablement_links(), policy_state()
    r = subprocess.run(["sh", str(REPO / "tools" / "apt_install.sh"), str(dummy_deb)],
                       capture_output=True, text=True, timeout=900, env=ENV)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert subprocess.run(["dpkg-query", "-W", NAME], capture_output=True).returncode == 0

    # While the package was configured, policy-rc.d forbade the start (101) and nothing started.
    assert POLICY_SEEN.read_text().strip() == "101"
    assert not STARTED.exists()
    # The machine's own policy-rc.d (or its absence) is back exactly as it was.
    assert policy_state() == policy_before
    # Nothing that was enabled before is gone, and nothing of the new package starts at boot.
    links_after = enablement_links()
    assert links_before <= links_after
    assert not [link for link in links_after - links_before if NAME in link]
    systemctl = subprocess.run(["systemctl", "is-enabled", f"{NAME}.service"], capture_output=True, text=True)
    assert systemctl.stdout.strip() == "disabled", systemctl.stdout + systemctl.stderr
    assert f"{NAME}" in r.stdout and "will not start at boot" in r.stdout


def test_already_installed_packages_are_left_alone(dummy_deb: Path) -> None:
    """A second run installs nothing new, so an admin's choice (here: enabled again) stays."""
    sh = ["sh", str(REPO / "tools" / "apt_install.sh"), str(dummy_deb)]
    assert subprocess.run(sh, capture_output=True, timeout=900, env=ENV).returncode == 0
    subprocess.run(["systemctl", "enable", f"{NAME}.service"], check=True, capture_output=True, env=ENV)
    r = subprocess.run(sh, capture_output=True, text=True, timeout=900, env=ENV)
    assert r.returncode == 0, r.stderr
    state = subprocess.run(["systemctl", "is-enabled", f"{NAME}.service"], capture_output=True, text=True)
    assert state.stdout.strip() == "enabled"
