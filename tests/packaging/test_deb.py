"""Issue 9 #17: the Debian package is a real install path for a device.

Builds the package with tools/build_deb.sh, installs it with dpkg, and walks README's "Running on a
device" as root would: `edgert` on PATH, the installed unit verified by systemd-analyze, the edgert
user and its directories, `edgert config example`, device keys and model imports as the edgert user,
`daemon --check`, the daemon itself serving from /etc/edgert/edgert.toml's models, then
`dpkg --purge` and a check that the system is as it was before. Needs root (CI runs as root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a Debian package: needs root (CI runs as root)"),
]

REPO = Path(__file__).resolve().parents[2]
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A clean environment: the installed package must not see this checkout through PYTHONPATH.
CLEAN_ENV = {"PATH": STD_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
UNIT = "/usr/lib/systemd/system/edgert.service"
BUILD_TIMEOUT_S = 1200
DPKG_LOCK_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
#: Everything the package creates or could leave behind.
WATCHED = (
    "/opt/edgert",
    "/etc/edgert",
    "/var/lib/edgert",
    "/run/edgert",
    "/usr/bin/edgert",
    "/usr/share/edgert",
    "/usr/share/doc/edgert",
    UNIT,
    "/lib/systemd/system/edgert.service",
    "/usr/lib/systemd/system/edgert-provision@.service",
    "/lib/systemd/system/edgert-provision@.service",
    "/usr/lib/sysusers.d/edgert.conf",
    "/usr/lib/tmpfiles.d/edgert.conf",
)
#: Directories where any entry named edgert* after the purge is a leftover.
SCANNED = ("/opt", "/etc", "/usr/bin", "/usr/share", "/var/lib", "/run", "/var/lib/dpkg/info",
           "/usr/lib/systemd/system", "/etc/systemd/system")  # fmt: skip
ACCOUNTS = ("/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow")


def run(*args: str, check: bool = True, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command with the clean environment, from /, and capture its output."""
    kw.setdefault("env", CLEAN_ENV)
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd="/", **kw)
    if check:
        assert r.returncode == 0, f"{args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def as_edgert(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """README's `sudo -u edgert edgert …`, as root does it (runuser needs no sudo)."""
    return run("runuser", "-u", "edgert", "--", *args, check=check)


def dpkg(*args: str) -> subprocess.CompletedProcess[str]:
    """dpkg, waiting while another apt/dpkg run holds the lock (a condition, bounded)."""
    deadline = time.monotonic() + DPKG_LOCK_TIMEOUT_S
    while True:
        r = run("dpkg", *args, check=False)
        locked = r.returncode != 0 and "lock" in r.stderr and "held" in r.stderr
        if not locked or time.monotonic() > deadline:
            assert r.returncode == 0, f"dpkg {args} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
            return r
        time.sleep(1)


def package_status() -> str:
    r = run("dpkg-query", "-W", "-f", "${db:Status-Status}", "edgert", check=False)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def snapshot() -> dict[str, Any]:
    """What the package could change: its paths, edgert* entries, account entries, dpkg's record."""
    return {
        "exists": {p: os.path.lexists(p) for p in WATCHED},
        "entries": {d: sorted(n for n in os.listdir(d) if "edgert" in n) for d in SCANNED if _isdir(d)},
        "wants": sorted(str(p) for p in Path("/etc/systemd/system").glob("*/edgert*")),
        "accounts": {
            f: [line for line in Path(f).read_text().splitlines() if line.startswith("edgert:")]
            for f in ACCOUNTS
            if os.path.exists(f)
        },
        "status": package_status(),
    }


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built from this checkout by tools/build_deb.sh."""
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run(
        ["bash", str(REPO / "tools" / "build_deb.sh"), str(out)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=REPO,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    debs = list(out.glob("edgert_*.deb"))
    assert len(debs) == 1 and r.stdout.strip().splitlines()[-1] == str(debs[0])
    return debs[0]


@pytest.fixture
def clean_system() -> Iterator[dict[str, Any]]:
    """The state before the install; the package is purged afterwards even if the test fails."""
    if package_status() not in ("unknown", "not-installed", "config-files"):
        pytest.fail("an edgert package is already installed here; this test will not touch it")
    before = snapshot()
    yield before
    if package_status() != "unknown":
        run("dpkg", "--purge", "edgert", check=False)


def test_package_metadata_and_contents(deb: Path) -> None:
    control = run("dpkg-deb", "-f", str(deb)).stdout
    assert "Package: edgert" in control
    assert "Depends: python3 (>= 3." in control and "python3 (<< 3." in control
    files = run("dpkg-deb", "-c", str(deb)).stdout
    expected = (
        "./opt/edgert/bin/edgert",
        "./opt/edgert/pyvenv.cfg",
        "./usr/bin/edgert -> /opt/edgert/bin/edgert",
        "." + UNIT,
        "./usr/lib/systemd/system/edgert-provision@.service",
        "./usr/lib/sysusers.d/edgert.conf",
        "./usr/lib/tmpfiles.d/edgert.conf",
        "./etc/edgert/edgert.toml",
        "./usr/share/edgert/models -> /opt/edgert/lib/python3.",
    )
    for path in expected:
        assert path in files, path
    with tempfile.TemporaryDirectory() as d:
        run("dpkg-deb", "-e", str(deb), d)
        assert Path(d, "conffiles").read_text().split() == ["/etc/edgert/edgert.toml"]


def test_install_run_as_a_device_and_purge(deb: Path, clean_system: dict[str, Any]) -> None:
    dpkg("-i", str(deb))
    assert package_status() == "installed"

    # edgert is on PATH, and it is the packaged venv, not this checkout.
    assert run("sh", "-c", "command -v edgert").stdout.strip() == "/usr/bin/edgert"
    assert "daemon" in run("edgert", "--help").stdout
    where = run("/opt/edgert/bin/python", "-c", "import edgert; print(edgert.__file__)").stdout
    assert where.startswith("/opt/edgert/lib/python3.")
    example = (REPO / "packaging" / "edgert.toml").read_text()
    assert run("edgert", "config", "example").stdout == example
    assert Path("/etc/edgert/edgert.toml").read_text() == example

    # The installed unit as systemd sees it, with the real ExecStart.
    unit = Path(UNIT).read_text()
    assert "ExecStart=/opt/edgert/bin/edgert daemon -c /etc/edgert/edgert.toml" in unit
    verify = run("systemd-analyze", "verify", UNIT, check=False)
    assert verify.returncode == 0, verify.stderr
    assert "Unknown key" not in verify.stderr and "Unknown lvalue" not in verify.stderr, verify.stderr

    # The user the unit runs as, its state, the config only root writes and the daemon reads.
    assert run("id", "-u", "edgert").returncode == 0
    state = os.stat("/var/lib/edgert")
    assert state.st_mode & 0o777 == 0o700 and _owner(state) == ("edgert", "edgert")
    conf = os.stat("/etc/edgert/edgert.toml")
    assert conf.st_mode & 0o777 == 0o640 and _owner(conf) == ("root", "edgert")

    # README "Running on a device", in order.
    assert "detected profile" in run("edgert", "doctor").stdout
    as_edgert("edgert", "keys", "init")
    keys = [os.stat(k) for k in sorted(Path("/var/lib/edgert/keys").iterdir())]
    assert keys and all(k.st_mode & 0o777 == 0o600 and _owner(k)[0] == "edgert" for k in keys)
    for name in ("digits-small", "digits-large"):
        model = f"/usr/share/edgert/models/{name.replace('-', '_')}_int8.onnx"
        as_edgert("edgert", "models", "import", model, "--name", name, "--version", "1")
    as_edgert("edgert", "daemon", "--check", "-c", "/etc/edgert/edgert.toml")
    _serve_once_as_edgert(example)

    dpkg("--purge", "edgert")
    assert snapshot() == clean_system


def _isdir(path: str) -> bool:
    return Path(path).is_dir()


def _owner(st: os.stat_result) -> tuple[str, str]:
    import grp
    import pwd

    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name


def _serve_once_as_edgert(example: str) -> None:
    """Run the installed daemon as edgert on the installed config (free ports), infer once, stop it."""
    from edgert.client import Client

    # Same models, socket and state as /etc/edgert/edgert.toml; only the TCP ports are picked freely.
    text = example.replace('listen = "127.0.0.1:8000"', 'listen = "127.0.0.1:0"')
    text = text.replace('listen = "127.0.0.1:9100"', 'listen = "127.0.0.1:0"')
    assert text != example
    workdir = Path(tempfile.mkdtemp(prefix="edgert-deb-"))
    try:
        workdir.chmod(0o755)
        config = workdir / "edgert.toml"
        config.write_text(text)
        config.chmod(0o644)
        with open(workdir / "daemon.log", "wb") as log:
            proc = subprocess.Popen(
                ["setpriv", "--reuid=edgert", "--regid=edgert", "--init-groups",
                 "/usr/bin/edgert", "daemon", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=log, env=CLEAN_ENV, cwd="/",
            )  # fmt: skip
            try:
                sock = "unix:///run/edgert/edgert.sock"
                deadline = time.monotonic() + READY_TIMEOUT_S
                while True:
                    if proc.poll() is not None:
                        pytest.fail("daemon exited: " + (workdir / "daemon.log").read_text()[-3000:])
                    try:
                        with Client(sock) as c:
                            if c.ready():
                                break
                    except Exception:
                        pass
                    assert time.monotonic() < deadline, "daemon did not become ready"
                    time.sleep(0.05)
                with np.load(REPO / "models" / "digits_test.npz") as npz:
                    x = npz["x"][:2]
                with Client(sock) as c:
                    logits = c.infer("digits", {"pixels": x})["logits"]
                assert logits.shape == (2, 10)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                code = proc.wait(STOP_TIMEOUT_S)
        assert code == 0, (workdir / "daemon.log").read_text()[-3000:]
    finally:
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()
