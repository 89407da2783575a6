"""kill -9 at every step of an install, then reopen: old state or new, never a mix; active loads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgert.security.atomic import FileSystem
from edgert.security.keys import DeviceKeys
from edgert.security.store import ModelStore
from tests.security.kit import MODELS, REPO, SMALL_ONNX, make_package

CHILD = r"""
import os, signal, sys
from pathlib import Path
from edgert.security.atomic import FileSystem
from edgert.security.keys import load_keystore
from edgert.security.store import ModelStore

state, pkg, crash_at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

def on_step(step):
    print(step, flush=True)
    if step == crash_at:
        os.kill(os.getpid(), signal.SIGKILL)

store = ModelStore(state / "models", load_keystore(state / "keys"), fs=FileSystem(on_step))
store.install(pkg)
print("done", flush=True)
"""


def _run(state: Path, pkg: Path, crash_at: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD, str(state), str(pkg), crash_at], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def _steps(state: Path, pkg: Path) -> list[str]:
    """Every step of an install, recorded by a dry run on a copy of the store."""
    import shutil

    copy = state.parent / "dry"
    shutil.copytree(state, copy)
    result = _run(copy, pkg, "never")
    assert result.returncode == 0, result.stderr
    steps = result.stdout.split()
    assert steps[-1] == "done"
    return steps[:-1]


@pytest.mark.integration
@pytest.mark.slow
def test_kill_at_every_install_step(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    models = state / "models"
    v1 = tmp_path / "v1.edgepkg"
    # Signed with the device's own key (a local import), so the child process's store accepts them.
    v1.write_bytes(make_package(SMALL_ONNX, [device_keys], version="1", signer=device_keys.sign))
    ModelStore(models, device_keys).install(v1)
    v2 = tmp_path / "v2.edgepkg"
    v2.write_bytes(make_package(MODELS / "digits_large_int8.onnx", [device_keys], version="2",
                                signer=device_keys.sign))
    ModelStore(models, device_keys).install(v2)
    v3 = tmp_path / "v3.edgepkg"  # installing 3 makes 2 previous (and, since issue 8, prunes nothing)
    v3.write_bytes(make_package(SMALL_ONNX, [device_keys], version="3", signer=device_keys.sign))
    steps = _steps(state, v3)
    expected = {"package:written", "package:replaced", "state:fsynced", "state:replaced"}
    assert expected <= set(steps) and not any(s.startswith("prune") for s in steps)
    before = json.loads((models / "state.json").read_text())
    for step in steps:
        state_before = (models / "state.json").read_bytes()
        result = _run(state, v3, step)
        assert result.returncode == -signal.SIGKILL, (step, result.stderr)
        store = ModelStore(models, device_keys)  # reopen: recovery runs here
        after = json.loads((models / "state.json").read_text())
        new_state = step.startswith(("state:replaced", "state:dir-fsynced"))
        if new_state:
            assert after["models"]["digits"]["active"] == "3", step
            assert after["models"]["digits"]["previous"] == "2", step
        else:
            assert after == before, step
        # Whatever the state says is on disk, and nothing else is.
        on_disk = sorted(p.name for p in (models / "packages" / "digits").iterdir())
        assert on_disk == sorted(f"{v}.edgepkg" for v in after["models"]["digits"]["installed"]), step
        manifest, plain = store.read_model("digits")
        assert manifest.version == after["models"]["digits"]["active"]
        expected = SMALL_ONNX if manifest.version in ("1", "3") else MODELS / "digits_large_int8.onnx"
        assert bytes(plain) == expected.read_bytes()
        # Put the old state back for the next crash point (via the store's own atomic writer).
        if new_state:
            FileSystem().atomic_write(models / "state.json", [state_before], step="reset")
            (models / "packages" / "digits" / "3.edgepkg").unlink(missing_ok=True)
    assert len(steps) >= 8
