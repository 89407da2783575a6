"""Audit log: chain, signed checkpoints, tamper detection with the first bad index, rotation, threads,
retention with signed pruning, the signed head and the refusal aggregation (fake monotonic clock)."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.security.audit import (
    AuditLog,
    RefusalAggregator,
    is_refusal,
    read_lines,
    read_records,
    record_hash,
    verify_dir,
    verify_lines,
)
from edgert.security.audit_chain import (
    GAP_EVENT,
    GENESIS,
    HEAD_FILE,
    HEAD_MISSING_EVENT,
    PRUNED_EVENT,
    canonical,
    checkpoint_message,
    read_head,
    verify_head,
)

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


# ---- refusal aggregation ---------------------------------------------------------------------

class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _events(directory: Path, name: str) -> list[dict[str, Any]]:
    return [r["data"] for r in read_records(directory) if r["event"] == name]


def test_refusals_are_one_record_per_reason_and_interval_with_a_count(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    clock = FakeClock()
    agg = RefusalAggregator(AuditLog(tmp_path / "audit", signer, clock=CLOCK), interval_s=60, clock=clock)
    for _ in range(100):
        agg.event("mqtt.command.refused", reason="unsigned", bytes=10)
        clock.t += 0.1
    for _ in range(30):
        agg.event("mqtt.command.refused", reason="bad_signature", bytes=5)
    agg.event("mqtt.command.accepted", cmd="ping", nonce="ab")  # not a refusal: written at once
    refused = _events(tmp_path / "audit", "mqtt.command.refused")
    assert [(d["reason"], d["count"]) for d in refused] == [("unsigned", 1), ("bad_signature", 1)]
    assert len(_events(tmp_path / "audit", "mqtt.command.accepted")) == 1
    assert agg.pending() == 99 + 29
    clock.t += 60
    agg.tick()  # the interval has passed: one summary per reason
    summaries = [d for d in _events(tmp_path / "audit", "mqtt.command.refused") if d.get("aggregated")]
    assert {d["reason"]: (d["count"], d["bytes"]) for d in summaries} == {
        "unsigned": (99, 990), "bad_signature": (29, 145)}
    assert agg.pending() == 0 and agg.aggregated == 128
    agg.event("mqtt.command.refused", reason="unsigned", bytes=10)  # a new interval starts at once
    agg.event("mqtt.command.refused", reason="unsigned", bytes=10)
    agg.close()  # pending summaries are written on close
    refused = _events(tmp_path / "audit", "mqtt.command.refused")
    assert len(refused) == 6
    assert sum(d["count"] for d in refused if d["reason"] == "unsigned") == 102
    assert sum(d["count"] for d in refused if d["reason"] == "bad_signature") == 30
    assert verify_dir(tmp_path / "audit", signer.public_key()).ok


def test_many_distinct_reasons_share_one_summary(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    clock = FakeClock()
    agg = RefusalAggregator(AuditLog(tmp_path / "audit", signer), clock=clock, max_keys=2)
    for i in range(1000):
        agg.event("mqtt.command.refused", reason=f"r{i}")
    agg.close()
    refused = _events(tmp_path / "audit", "mqtt.command.refused")
    assert len(refused) <= 4  # two keys, then "(other)": a first record and a summary each
    assert sum(d["count"] for d in refused) == 1000


def test_only_refusal_events_are_aggregated() -> None:
    assert is_refusal("mqtt.command.refused") and is_refusal("mqtt.message.rejected")
    assert not is_refusal("mqtt.command.accepted") and not is_refusal("mqtt.command.failed")
    assert not is_refusal("model_install_refused")  # an operator's action: every one is recorded


def test_the_aggregator_signs_a_checkpoint_when_records_wait(tmp_path: Path,
                                                             signer: ed25519.Ed25519PrivateKey) -> None:
    clock = FakeClock()
    log = AuditLog(tmp_path / "audit", signer, clock=CLOCK)
    agg = RefusalAggregator(log, clock=clock, checkpoint_interval_s=300)
    agg.event("config_change", what="x")
    agg.tick()
    assert log.unsigned == 1
    clock.t += 301
    agg.tick()
    head = log.head()
    assert log.unsigned == 0 and head is not None
    assert head["seq"] == max(r["i"] for r in read_records(tmp_path / "audit"))
    agg.close()


# ---- retention -------------------------------------------------------------------------------

def _fill(directory: Path, signer: ed25519.Ed25519PrivateKey, n: int, **kw: Any) -> None:
    with AuditLog(directory, signer, clock=CLOCK, **kw) as log:
        for i in range(n):
            log.append("model_load", model=f"m{i % 5}", version=str(i), source="store")


def test_retention_prunes_with_a_signed_record_and_verify_accepts_it(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    budget = 32 * 1024
    _fill(tmp_path / "audit", signer, 2000, max_total_bytes=budget)
    total = sum(p.stat().st_size for p in (tmp_path / "audit").iterdir())
    assert total <= budget
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert report.ok, report
    assert report.first_index > 0 and report.head_seq == report.last_index
    pruned = _events(tmp_path / "audit", PRUNED_EVENT)
    assert pruned[-1]["last"] == report.first_index - 1
    # Deleting the oldest remaining file by hand is not retention: no signed record says so.
    oldest = sorted((tmp_path / "audit").glob("audit-*.jsonl"))[0]
    start_next = report.first_index + len(oldest.read_bytes().splitlines())
    oldest.unlink()
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and report.first_bad == start_next
    assert "pruned" in (report.reason or "")


def test_an_unsigned_prune_claim_is_not_enough(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    _fill(tmp_path / "audit", signer, 300)
    lines = list(read_lines(tmp_path / "audit"))
    records = [json.loads(x) for x in lines]
    cut = 100  # an attacker drops records 0..99 and appends a claim, chained but without the key
    data = {"first": 0, "first_h": records[0]["h"], "last": cut - 1, "last_h": records[cut - 1]["h"]}
    claim: dict[str, Any] = {"i": len(records), "ts": records[-1]["ts"], "event": PRUNED_EVENT,
                             "prev": records[-1]["h"], "data": data}
    claim["h"] = record_hash(claim)
    report = verify_lines([*lines[cut:], canonical(claim)], signer.public_key())
    assert not report.ok and report.first_bad == cut and "pruned" in (report.reason or "")


def test_a_lowered_budget_prunes_at_open_and_an_interrupted_prune_still_verifies(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    _fill(tmp_path / "audit", signer, 1500, max_bytes=8 * 1024)
    before = {p.name: p.read_bytes() for p in (tmp_path / "audit").glob("audit-*.jsonl")}
    AuditLog(tmp_path / "audit", signer, max_total_bytes=48 * 1024).close()
    gone = sorted(set(before) - {p.name for p in (tmp_path / "audit").glob("audit-*.jsonl")})
    assert gone and [d["file"] for d in _events(tmp_path / "audit", PRUNED_EVENT)] == gone
    assert verify_dir(tmp_path / "audit", signer.public_key()).first_index > 0
    for name in gone:  # as if the process died after signing the claims, before deleting the files
        (tmp_path / "audit" / name).write_bytes(before[name])
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert report.ok and report.first_index == 0, report


def test_a_budget_below_the_minimum_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_total_bytes"):
        AuditLog(tmp_path / "audit", None, max_total_bytes=1000)


# ---- the signed head ---------------------------------------------------------------------------

def test_the_head_file_is_private_signed_and_follows_checkpoints(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    lines = _log(tmp_path, signer, n=12)
    head = read_head(tmp_path / "audit")
    assert head is not None
    assert ((tmp_path / "audit" / HEAD_FILE).stat().st_mode & 0o777) == 0o600
    last = json.loads(lines[-1])
    assert (head["seq"], head["hash"]) == (last["i"], last["h"]) and last["event"] == "checkpoint"
    assert verify_head(head, signer.public_key()) is None
    assert "signature" in (verify_head(head, ed25519.Ed25519PrivateKey.generate().public_key()) or "")
    forged = {**head, "seq": head["seq"] - 5}
    (tmp_path / "audit" / HEAD_FILE).write_text(json.dumps(forged))
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and "invalid signature" in (report.reason or "")


def _cut(directory: Path, keep: int) -> None:
    lines = list(read_lines(directory))[:keep]
    for path in directory.glob("audit-*.jsonl"):
        path.unlink()
    (directory / "audit-000001.jsonl").write_bytes(b"".join(x + b"\n" for x in lines))


def test_a_writer_that_finds_the_log_cut_back_records_it(tmp_path: Path,
                                                         signer: ed25519.Ed25519PrivateKey) -> None:
    _fill(tmp_path / "audit", signer, 600)
    _cut(tmp_path / "audit", 100)
    assert "truncated" in (verify_dir(tmp_path / "audit", signer.public_key()).reason or "")
    _fill(tmp_path / "audit", signer, 600)  # a restart writes on, and moves the head past the cut
    gaps = _events(tmp_path / "audit", GAP_EVENT)
    assert len(gaps) == 1 and gaps[0]["found_last"] == 99 and gaps[0]["source"] == "head file"
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and report.first_bad == 100 and "truncated" in (report.reason or "")


def test_a_running_writer_notices_a_cut_under_it(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    log = AuditLog(tmp_path / "audit", signer, clock=CLOCK)
    for i in range(300):
        log.append("model_load", n=i)
    _cut(tmp_path / "audit", 50)
    log.append("model_load", n=300)
    log.close()
    gaps = _events(tmp_path / "audit", GAP_EVENT)
    assert [(g["found_last"], g["source"]) for g in gaps] == [(49, "writer")]
    assert not verify_dir(tmp_path / "audit", signer.public_key()).ok


def test_a_deleted_head_file_is_recorded_by_the_next_writer(tmp_path: Path,
                                                            signer: ed25519.Ed25519PrivateKey) -> None:
    _fill(tmp_path / "audit", signer, 50)
    (tmp_path / "audit" / HEAD_FILE).unlink()
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and "head file is missing" in (report.reason or "")
    _fill(tmp_path / "audit", signer, 5)  # the next writer re-anchors, and says why
    assert len(_events(tmp_path / "audit", HEAD_MISSING_EVENT)) == 1
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and "head file was deleted" in (report.reason or "")


def _legacy_log(directory: Path, signer: ed25519.Ed25519PrivateKey, n: int) -> None:
    """A log as written before head files existed: checkpoints without the 'anchored' field."""
    directory.mkdir(parents=True)
    prev, lines = GENESIS, []
    for i in range(n):
        last = i == n - 1
        data = ({"sig": base64.b64encode(signer.sign(checkpoint_message(i, prev))).decode()} if last
                else {"model": "m", "version": str(i)})
        record: dict[str, Any] = {"i": i, "ts": "2025-01-01T00:00:00.000000Z", "data": data, "prev": prev,
                                  "event": "checkpoint" if last else "model_install"}
        record["h"] = record_hash(record)
        prev = record["h"]
        lines.append(canonical(record) + b"\n")
    (directory / "audit-000001.jsonl").write_bytes(b"".join(lines))


def test_a_log_from_before_head_files_is_adopted(tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    _legacy_log(tmp_path / "audit", signer, 8)
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert report.ok and report.head_seq is None  # nothing to compare with yet
    _fill(tmp_path / "audit", signer, 3)
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert report.ok and report.head_seq == report.last_index, report
    assert _events(tmp_path / "audit", HEAD_MISSING_EVENT)[0]["last"] == 7


def test_only_the_fleets_copy_catches_a_rollback_of_log_and_head_together(
        tmp_path: Path, signer: ed25519.Ed25519PrivateKey) -> None:
    _fill(tmp_path / "audit", signer, 300)
    shutil.copytree(tmp_path / "audit", tmp_path / "old")  # an older, consistent pair
    _fill(tmp_path / "audit", signer, 300)
    fleet = read_head(tmp_path / "audit")  # what status/telemetry sent to the fleet
    shutil.rmtree(tmp_path / "audit")
    shutil.copytree(tmp_path / "old", tmp_path / "audit")
    assert verify_dir(tmp_path / "audit", signer.public_key()).ok  # undetectable on the device alone
    report = verify_dir(tmp_path / "audit", signer.public_key(), fleet_head=fleet)
    assert not report.ok and "fleet" in (report.reason or "") and "truncated" in (report.reason or "")


def test_a_writer_that_finds_the_log_deleted_records_it(tmp_path: Path,
                                                        signer: ed25519.Ed25519PrivateKey) -> None:
    _fill(tmp_path / "audit", signer, 300)
    for path in (tmp_path / "audit").glob("audit-*.jsonl"):
        path.unlink()
    _fill(tmp_path / "audit", signer, 3)  # a new chain starts, but it begins by saying what was lost
    assert _events(tmp_path / "audit", GAP_EVENT)[0]["found_last"] == -1
    report = verify_dir(tmp_path / "audit", signer.public_key())
    assert not report.ok and report.first_bad == 0
    assert "truncated" in (report.reason or "") and "empty or missing" in (report.reason or "")
