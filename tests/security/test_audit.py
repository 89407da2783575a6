"""Audit log: chain, signed checkpoints, tamper detection with the first bad index, rotation, threads."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.security.audit import AuditLog, read_lines, record_hash, verify_dir, verify_lines

CLOCK = lambda: 1_700_000_000.0  # noqa: E731


@pytest.fixture
def signer() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def _log(tmp_path: Path, signer: ed25519.Ed25519PrivateKey, n: int = 20, **kw: object) -> list[bytes]:
    with AuditLog(tmp_path / "audit", signer, clock=CLOCK, checkpoint_every=5, **kw) as log:  # type: ignore[arg-type]
        for i in range(n):
            log.append("model_install", model=f"m{i}", version=str(i))
    return list(read_lines(tmp_path / "audit"))


def test_clean_log_verifies(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    lines = _log(tmp_path, signer)
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert report.ok and report.records == len(lines)
    assert report.checkpoints >= 4 and report.unsigned_tail == 0


def test_edit_delete_reorder_insert_are_found_at_the_first_bad_index(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    lines = _log(tmp_path, signer)
    pub = signer.public_key()
    edited = list(lines)
    edited[7] = edited[7].replace(b'"m', b'"X', 1)
    assert verify_lines(edited, pub).first_bad == 7
    assert verify_lines(lines[:4] + lines[5:], pub).first_bad == 4
    assert verify_lines([*lines[:9], lines[10], lines[9], *lines[11:]], pub).first_bad == 9
    assert verify_lines([*lines[:3], lines[12], *lines[3:]], pub).first_bad == 3
    assert verify_lines([b"not json", *lines], pub).first_bad == 0


def test_rehashed_rewrite_is_caught_by_the_next_checkpoint(tmp_path: Path,
                                                           signer: ed25519.Ed25519PrivateKey) -> None:
    lines = _log(tmp_path, signer)
    records = [json.loads(x) for x in lines]
    records[2]["data"]["version"] = "999"  # an attacker without the key re-chains everything after it
    prev = records[1]["h"]
    for r in records[2:]:
        r["prev"] = prev
        r["h"] = record_hash(r)
        prev = r["h"]
    forged = [json.dumps(r, sort_keys=True, separators=(",", ":")).encode() for r in records]
    report = verify_lines(forged, signer.public_key())
    first_checkpoint_after = next(i for i, r in enumerate(records) if i > 2 and r["event"] == "checkpoint")
    assert not report.ok and report.first_bad == first_checkpoint_after
    assert "signature" in (report.reason or "")
    assert verify_lines(forged, ed25519.Ed25519PrivateKey.generate().public_key()).first_bad is not None


def test_rotation_carries_the_chain(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    lines = _log(tmp_path, signer, n=60, max_bytes=2000)
    files = sorted((tmp_path / "audit").glob("audit-*.jsonl"))
    assert len(files) >= 3
    assert verify_dir(tmp_path / "audit", signer.public_key()).ok
    files[1].unlink()  # deleting a whole middle file breaks the chain
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and report.first_bad is not None and report.first_bad < len(lines)


def test_reopen_continues_and_drops_a_torn_last_line(tmp_path: Path,
                                                     signer: ed25519.Ed25519PrivateKey) -> None:
    _log(tmp_path, signer, n=3)
    path = sorted((tmp_path / "audit").glob("audit-*.jsonl"))[-1]
    with open(path, "ab") as f:
        f.write(b'{"i":99,"partial')  # a crash in the middle of a write
    with AuditLog(tmp_path / "audit", signer, clock=CLOCK) as log:
        log.append("config_change", what="x")
    assert verify_dir(tmp_path / "audit", signer.public_key()).ok


def test_threads_and_two_writers_keep_one_chain(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    a = AuditLog(tmp_path / "audit", signer, max_bytes=20_000)
    b = AuditLog(tmp_path / "audit", signer, max_bytes=20_000)  # e.g. the CLI while the daemon runs

    def work(log: AuditLog, tag: str) -> None:
        for i in range(100):
            log.append("request", who=tag, n=i)

    threads = [threading.Thread(target=work, args=(log, f"{name}{t}"))
               for name, log in (("a", a), ("b", b)) for t in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.close()
    b.close()
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert report.ok and report.records >= 600


def test_secrets_redacted_and_tensors_refused(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    with AuditLog(tmp_path / "audit", signer) as log:
        rec = log.append("provision_step", password="hunter2", api_token="t0k", wrap_public_key="x25519:AA",
                         nested={"private_key": "PEM"})
        with pytest.raises(ValueError, match="raw bytes or a tensor"):
            log.append("infer", inputs=np.zeros(3))
        with pytest.raises(ValueError):
            log.append("infer", blob=b"\x00")
    text = b"".join(read_lines(tmp_path / "audit"))
    assert b"hunter2" not in text and b"t0k" not in text and b"PEM" not in text
    assert rec["data"]["wrap_public_key"] == "x25519:AA"
