"""Issue 8 item 6: ``edgert daemon --check`` must fail on what would fail at start.

Before: ``--check`` only parsed the file, so a config naming a profile that does not exist (the
example config's own suggestion, ``raspberry-pi-5``) or a model that is not installed passed the
check and then failed when the daemon started. These tests drive the real CLI in a subprocess.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


def _config(tmp_path: Path, state: Path, body: str, *, http: str = "127.0.0.1:0") -> Path:
    cfg = tmp_path / "edgert.toml"
    cfg.write_text(
        f'[daemon]\nstate_dir = "{state}"\n{body}\n'
        f'[http]\nlisten = "{http}"\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[socket]\npath = "{tmp_path / "run" / "edgert.sock"}"\n'
    )
    return cfg


@pytest.fixture(scope="module")
def device_state(tmp_path_factory: pytest.TempPathFactory, edgert_cli, models_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    """A state dir with device keys and the digits model imported as "digits", made with the CLI."""
    state = tmp_path_factory.mktemp("state")
    r = edgert_cli("keys", "init", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    r = edgert_cli(
        "models",
        "import",
        str(models_dir / "digits_small_int8.onnx"),
        "--name",
        "digits",
        "--state-dir",
        str(state),
    )
    assert r.returncode == 0, r.stderr
    return state


def test_good_config_passes(tmp_path: Path, device_state: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(tmp_path, device_state, 'profile = "cpu-generic"\n[[models]]\nname = "digits"\n')
    r = edgert_cli("daemon", "--check", "-c", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "error" not in r.stdout.split()
    assert "model digits" in r.stdout and "decrypts" in r.stdout


def test_missing_profile_fails_and_names_the_existing_ones(
    tmp_path: Path,
    device_state: Path,
    edgert_cli,  # type: ignore[no-untyped-def]
) -> None:
    cfg = _config(tmp_path, device_state, 'profile = "raspberry-pi-5"\n[[models]]\nname = "digits"\n')
    r = edgert_cli("daemon", "--check", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[:2] == ["error", "profile"])
    assert "raspberry-pi-5" in line and "cpu-generic" in line and "raspberry-pi" in line


def test_uninstalled_model_fails(tmp_path: Path, device_state: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    cfg = _config(
        tmp_path,
        device_state,
        'profile = "cpu-generic"\n[[models]]\nname = "digits"\n[[models]]\nname = "mnist"\n',
    )
    r = edgert_cli("daemon", "--check", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[:3] == ["error", "model", "mnist"])
    assert "not installed" in line and "installed: digits" in line
    assert "ok       model digits" in r.stdout


def test_busy_port_fails(tmp_path: Path, device_state: Path, edgert_cli) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = _config(tmp_path, device_state, 'profile = "cpu-generic"\n', http=f"127.0.0.1:{port}")
        r = edgert_cli("daemon", "--check", "-c", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.split()[:2] == ["error", "http"])
    assert f"127.0.0.1:{port} is already in use" in line
