"""A locked spool is not a corrupt spool (issue 9, C6).

A second process holding ``BEGIN IMMEDIATE`` on ``telemetry.sqlite`` used to make the daemon "rebuild
a corrupt spool": every pending record was lost and a ``.corrupt-*`` copy was left behind each time.
These tests take the lock from a real second process (python's sqlite3 in a subprocess).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgert.mqtt.spool import Spool

pytestmark = pytest.mark.integration

#: How long the other process holds the write lock in the reported incident.
REPORTED_LOCK_S = 8.0
RECORDS = 20
WAIT_S = 60.0

# The locker takes the write lock, writes one record of its own inside the transaction, then holds
# the lock for argv[2] seconds, or until it reads a line on stdin when argv[2] is "stdin". With
# argv[3] == "exclusive" it also locks readers out (``PRAGMA locking_mode=EXCLUSIVE``, as a backup
# tool or an sqlite3 shell can), which makes even opening the spool wait.
_LOCKER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[3] == "exclusive":
    db.execute("PRAGMA locking_mode=EXCLUSIVE")
    db.execute("BEGIN EXCLUSIVE")
else:
    db.execute("BEGIN IMMEDIATE")
db.execute("INSERT INTO spool(topic, payload, ts) VALUES ('locker', X'7B7D', 0)")
print("locked", flush=True)
if sys.argv[2] == "stdin":
    sys.stdin.readline()
else:
    time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
db.close()
print("released", flush=True)
"""


class Locker:
    """A second process holding ``BEGIN IMMEDIATE`` on a SQLite file."""

    def __init__(self, path: Path, hold: str, *, exclusive: bool = False) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LOCKER, str(path), hold, "exclusive" if exclusive else "immediate"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "locked", f"locker did not take the lock: {line!r}"

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_released(self) -> None:
        assert self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=WAIT_S)
        assert self.proc.returncode == 0 and "released" in out, "the locker could not commit"


def _payloads(spool: Spool) -> list[tuple[str, object]]:
    return [(r.topic, json.loads(r.payload).get("i")) for r in spool.peek(0, 10_000)]


def _aside(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name)


def test_lock_held_8s_by_another_process_loses_no_records(tmp_path: Path) -> None:
    path = tmp_path / "spool" / "telemetry.sqlite"
    spool = Spool(path, 10_000)
    # The backlog of a device that was offline for a while.
    for i in range(RECORDS):
        spool.enqueue("backlog", json.dumps({"i": i}).encode(), float(i))
    locker = Locker(path, str(REPORTED_LOCK_S))
    try:
        ids = [spool.enqueue("t", json.dumps({"i": i}).encode(), float(i)) for i in range(RECORDS)]
    finally:
        locker.wait_released()
    stats = spool.stats()
    got = _payloads(spool)
    spool.close()
    lost = stats["lost_on_rebuild"] + stats["lost_unknown"]
    assert (lost, stats["rebuilds"]) == (0, 0), f"a lock was treated as corruption: {stats}"
    assert all(isinstance(i, int) for i in ids), "every append reached the spool file"
    expected = (
        [("backlog", i) for i in range(RECORDS)] + [("locker", None)] + [("t", i) for i in range(RECORDS)]
    )
    assert got == expected, "records lost or reordered (the locker's own commit included)"
    assert stats["pending"] == 2 * RECORDS  # the spool counts its own writes, not the other process's
    assert _aside(path.parent) == [], "no .corrupt-* copy for a lock"


def test_lock_longer_than_the_retry_budget_keeps_records_in_order(tmp_path: Path) -> None:
    """Past the bounded retries the records wait in memory (no rebuild) and are written in order later."""
    path = tmp_path / "telemetry.sqlite"
    spool = Spool(path, 10_000, busy_timeout_s=0.05, busy_retries=1)
    spool.enqueue("t", json.dumps({"i": 0}).encode(), 0.0)
    locker = Locker(path, "stdin")
    try:
        during = [spool.enqueue("t", json.dumps({"i": i}).encode(), float(i)) for i in range(1, 6)]
        assert during == [None] * 5, "the file is locked: nothing can be written yet"
        assert spool.pending == 6 and spool.stats()["rebuilds"] == 0
        assert _payloads(spool) == [("t", 0)]
    finally:
        locker.release()
        locker.wait_released()
    assert isinstance(spool.enqueue("t", json.dumps({"i": 6}).encode(), 6.0), int)
    assert _payloads(spool) == [("t", 0), ("locker", None)] + [("t", i) for i in range(1, 7)]
    stats = spool.stats()
    assert stats["pending"] == 7 and stats["rebuilds"] == 0 and stats["dropped_busy"] == 0
    spool.close()
    assert _aside(tmp_path) == []


def test_acks_while_locked_are_applied_later_and_never_raise(tmp_path: Path) -> None:
    path = tmp_path / "telemetry.sqlite"
    spool = Spool(path, 100, busy_timeout_s=0.05, busy_retries=1)
    ids = [spool.enqueue("t", json.dumps({"i": i}).encode(), float(i)) for i in range(4)]
    assert all(isinstance(i, int) for i in ids)
    locker = Locker(path, "stdin")
    try:
        spool.ack_many([ids[0], ids[1]])  # the drain thread must not crash on a lock
        spool.reject(ids[2], 0x87, "Not authorized")
    finally:
        locker.release()
        locker.wait_released()
    spool.enqueue("t", json.dumps({"i": 4}).encode(), 4.0)  # the next write applies what waited
    assert _payloads(spool) == [("t", 3), ("locker", None), ("t", 4)]
    assert spool.rejected()[0]["id"] == ids[2] and spool.stats()["rebuilds"] == 0
    spool.close()


def test_open_while_another_process_holds_an_exclusive_lock_for_8s_is_not_a_rebuild(tmp_path: Path) -> None:
    """A daemon (re)starting while another process holds the file: wait and retry, never rebuild."""
    path = tmp_path / "telemetry.sqlite"
    first = Spool(path, 100)
    for i in range(RECORDS):
        first.enqueue("t", json.dumps({"i": i}).encode(), float(i))
    first.close()
    locker = Locker(path, str(REPORTED_LOCK_S), exclusive=True)
    try:
        spool = Spool(path, 100)
    finally:
        locker.wait_released()
    stats = spool.stats()
    assert (stats["rebuilds"], stats["lost_on_rebuild"]) == (0, 0), stats
    spool.enqueue("t", json.dumps({"i": RECORDS}).encode(), 0.0)
    assert [i for _, i in _payloads(spool)] == [*range(RECORDS), None, RECORDS]
    spool.close()
    assert _aside(tmp_path) == []
