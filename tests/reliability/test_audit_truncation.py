"""Issue 9 B.5: ``edgert audit verify`` must notice a truncated, emptied or deleted log.

The review cut a 13,067-record log back to an earlier checkpoint and got ``ok: 6 records, 2 signed
checkpoints`` (exit 0); an empty or deleted log also passed. The log is written through the real
loader path and checked with the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgert.security.audit import read_lines
from edgert.security.loader import open_audit, open_keystore
from tests.conftest import run_edgert

pytestmark = pytest.mark.integration

#: Size of the review's log.
REVIEW_RECORDS = 13_067
INTEGRITY_EXIT = 6


@pytest.fixture(scope="module")
def long_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory whose audit log holds the review's 13,067 events (and its checkpoints)."""
    root = tmp_path_factory.mktemp("audit-long") / "state"
    keys = open_keystore(root, create=True)
    with open_audit(root, keys) as audit:
        for i in range(REVIEW_RECORDS):
            audit.append("model_install", model=f"m{i % 13}", version=str(i))
    return root


@pytest.fixture
def state(long_state: Path, tmp_path: Path) -> Path:
    """A private copy of the long log for one test to damage."""
    root = tmp_path / "state"
    shutil.copytree(long_state, root)
    return root


def _audit_files(root: Path) -> list[Path]:
    return sorted((root / "audit").glob("audit-*.jsonl"))


def _verify(root: Path, *extra: str) -> tuple[int, str]:
    r = run_edgert("audit", "verify", "--state-dir", str(root), *extra)
    return r.returncode, r.stdout + r.stderr


def _cut_to_second_checkpoint(root: Path) -> int:
    """Rewrite the log as its prefix up to the second checkpoint (what the review did); return its length."""
    lines = list(read_lines(root / "audit"))
    cuts = [n for n, line in enumerate(lines) if json.loads(line)["event"] == "checkpoint"]
    keep = lines[: cuts[1] + 1]
    for path in _audit_files(root):
        path.unlink()
    (root / "audit" / "audit-000001.jsonl").write_bytes(b"".join(x + b"\n" for x in keep))
    return len(keep)


def test_the_intact_long_log_verifies(state: Path) -> None:
    code, out = _verify(state)
    assert code == 0, out
    assert "audit log ok" in out


def test_a_log_cut_back_to_an_earlier_checkpoint_is_reported(state: Path) -> None:
    kept = _cut_to_second_checkpoint(state)
    assert kept < REVIEW_RECORDS // 10
    code, out = _verify(state)
    assert code == INTEGRITY_EXIT, out
    assert "truncated" in out and "head" in out, out


def test_an_emptied_log_is_reported(state: Path) -> None:
    for path in _audit_files(state):
        path.write_bytes(b"")
    code, out = _verify(state)
    assert code == INTEGRITY_EXIT, out
    assert "empty or missing" in out, out


def test_a_deleted_log_is_reported(state: Path) -> None:
    for path in _audit_files(state):
        path.unlink()
    code, out = _verify(state)
    assert code == INTEGRITY_EXIT, out
    assert "empty or missing" in out, out


def test_a_deleted_log_directory_is_reported(state: Path) -> None:
    shutil.rmtree(state / "audit")  # the log and its head file together
    code, out = _verify(state)
    assert code == INTEGRITY_EXIT, out
    assert "no audit records" in out, out


def test_a_cut_log_with_its_head_file_deleted_is_reported(state: Path) -> None:
    _cut_to_second_checkpoint(state)
    for head in (state / "audit").glob("head*"):
        head.unlink()
    code, out = _verify(state)
    assert code == INTEGRITY_EXIT, out
    assert "head file" in out and "missing" in out, out


def test_a_restart_after_the_cut_does_not_hide_it(state: Path) -> None:
    _cut_to_second_checkpoint(state)
    keys = open_keystore(state)
    with open_audit(state, keys) as audit:  # e.g. the daemon starts again and writes on
        audit.append("daemon_start", pid=1)
    code, out = _verify(state)
    assert code == INTEGRITY_EXIT, out
    assert "truncated" in out, out


def test_only_the_fleets_copy_catches_a_rollback_of_log_and_head_together(state: Path,
                                                                          tmp_path: Path) -> None:
    shutil.copytree(state / "audit", tmp_path / "old-audit")  # an older, self-consistent log and head
    with open_audit(state, open_keystore(state)) as audit:
        for i in range(600):
            audit.append("model_activate", model="digits", version=str(i))
    r = run_edgert("audit", "head", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    fleet_copy = tmp_path / "fleet-head.json"
    fleet_copy.write_text(r.stdout)  # what status/telemetry gave the fleet
    assert json.loads(r.stdout)["seq"] > REVIEW_RECORDS
    shutil.rmtree(state / "audit")
    shutil.copytree(tmp_path / "old-audit", state / "audit")
    code, out = _verify(state)
    assert code == 0, out  # the device alone cannot tell (documented in docs/security.md)
    code, out = _verify(state, "--fleet-head", str(fleet_copy))
    assert code == INTEGRITY_EXIT, out
    assert "fleet's copy" in out and "truncated" in out, out
