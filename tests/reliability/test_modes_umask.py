"""State modes do not depend on the umask (issue 9, D11).

Reported under umask 022: the state dir and ``spool/`` were 0755, the telemetry and nonce SQLite
files (and their -wal/-shm) 0644, and a 0755 ``keys/`` directory was accepted. Wanted: state
directories 0700, SQLite files and their -wal/-shm 0600, and a group/other-accessible keys directory
refused with a ``chmod 700`` hint. Checked in-process and with the real CLI and daemon in subprocesses.
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.device.sync import SyncService
from edgert.errors import KeyFileError
from edgert.mqtt.nonces import NONCE_FILE, PersistentNonceCache
from edgert.mqtt.spool import Spool
from edgert.security.keys import init_keystore, load_keystore
from tests.brokers import Mosquitto, free_port
from tests.mqtt.conftest import Recorder, make_config, require_mosquitto, wait_for

MODELS = Path(__file__).resolve().parents[2] / "models"
REPO = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
CLI_TIMEOUT_S = 120.0


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def sqlite_modes(db: Path) -> dict[str, int]:
    """Mode of a SQLite file and of each of its -wal/-shm that exists."""
    return {p.name: mode(p) for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")) if p.exists()}


@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _pubkey(tmp_path: Path) -> Path:
    pub = tmp_path / "fleet-cmd.pub"
    pub.write_bytes(
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return pub


def test_sync_state_is_private_under_umask_022(tmp_path: Path, umask022: None) -> None:
    state = tmp_path / "state"
    # The default layout ({state}/spool/telemetry.sqlite, the nonce store beside it); nothing exists yet.
    default = str(state / "spool" / "telemetry.sqlite")
    cfg = make_config(tmp_path, free_port(), spool_path=default, command_key_file=str(_pubkey(tmp_path)))
    svc = SyncService(cfg, state_root=state)
    try:
        svc.spool.enqueue("t", b"{}", 1.0)
        svc.nonces.check_and_add("ab" * 16, NOW + 60, NOW)
        spool = state / "spool" / "telemetry.sqlite"
        nonces = state / "spool" / NONCE_FILE
        seen = {"state": mode(state), "spool/": mode(spool.parent)}
        seen.update({**sqlite_modes(spool), **sqlite_modes(nonces)})
        assert Path(f"{spool}-wal").exists() and Path(f"{nonces}-wal").exists()
    finally:
        svc.link.stop()
        svc.spool.close()
        assert isinstance(svc.nonces, PersistentNonceCache)
        svc.nonces.close()
    assert seen == {"state": 0o700, "spool/": 0o700, **dict.fromkeys(
        ["telemetry.sqlite", "telemetry.sqlite-wal", "telemetry.sqlite-shm",
         NONCE_FILE, f"{NONCE_FILE}-wal", f"{NONCE_FILE}-shm"], 0o600)}


def test_files_left_loose_by_an_older_version_are_tightened(tmp_path: Path, umask022: None) -> None:
    spool_path, nonce_path = tmp_path / "telemetry.sqlite", tmp_path / NONCE_FILE
    for db in (spool_path, nonce_path):
        for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
            p.touch()
            os.chmod(p, 0o644)
    spool = Spool(spool_path, 10)
    cache = PersistentNonceCache(nonce_path, now=NOW)
    try:
        assert set(sqlite_modes(spool_path).values()) == {0o600}
        assert set(sqlite_modes(nonce_path).values()) == {0o600}
    finally:
        spool.close()
        cache.close()


def test_keystore_state_dir_is_private_and_a_shared_keys_dir_is_refused(
    tmp_path: Path, umask022: None
) -> None:
    state = tmp_path / "state"
    keys = init_keystore(state / "keys")
    assert (mode(state), mode(state / "keys")) == (0o700, 0o700)
    for loose in (0o755, 0o750, 0o701):
        os.chmod(state / "keys", loose)
        with pytest.raises(KeyFileError, match="too open") as exc:
            load_keystore(state / "keys")
        assert exc.value.hint == f"run: chmod 700 {state / 'keys'}"
    os.chmod(state / "keys", 0o700)
    assert load_keystore(state / "keys").wrap_fingerprint == keys.wrap_fingerprint


# -- subprocesses: the real CLI and daemon, started under umask 022 ----------------------------------


def _umask022(*args: str) -> list[str]:
    """A command line that runs ``python -m edgert.cli.main ARGS`` under umask 022."""
    cmd = shlex.join([sys.executable, "-m", "edgert.cli.main", *args])
    return ["/bin/sh", "-c", f"umask 022 && exec {cmd}"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(_umask022(*args), capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env,
                          cwd=str(REPO))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """An anonymous mosquitto on a free loopback port."""
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_cli_and_daemon_under_umask_022_create_private_state(tmp_path: Path, broker: Mosquitto) -> None:
    state = tmp_path / "state"
    r = _cli("keys", "init", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    config = tmp_path / "edgert.toml"
    config.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{state}"
allow_plaintext = true
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{tmp_path / "edgert.sock"}"
mode = "0600"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
fleet = "f1"
device_id = "dev-a"
telemetry_interval = 0.2
command_key_file = "{_pubkey(tmp_path)}"
[[models]]
name = "digits-small"
path = "{MODELS / "digits_small_int8.onnx"}"
""")
    rec = Recorder(broker.port)
    proc = subprocess.Popen(_umask022("daemon", "--config", str(config)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=str(REPO))
    spool = state / "spool" / "telemetry.sqlite"
    nonces = state / "spool" / NONCE_FILE
    try:
        wait_for(lambda: rec.on("/telemetry"), timeout=60, what="telemetry from the daemon (spool in use)")
        wait_for(lambda: all(Path(f"{db}-{s}").exists() for db in (spool, nonces) for s in ("wal", "shm")),
                 what="the -wal/-shm files of both stores")
        dirs = {str(p.relative_to(tmp_path)): mode(p) for p in (state, state / "spool", state / "keys")}
        files = {**sqlite_modes(spool), **sqlite_modes(nonces)}
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        rec.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert dirs == {"state": 0o700, "state/spool": 0o700, "state/keys": 0o700}
    assert len(files) == 6 and set(files.values()) == {0o600}, {k: oct(v) for k, v in files.items()}

    os.chmod(state / "keys", 0o755)
    show = _cli("keys", "show", "--state-dir", str(state))
    assert show.returncode != 0, "a group/other-readable keys directory is refused"
    assert "too open" in show.stderr and f"chmod 700 {state / 'keys'}" in show.stderr, show.stderr
