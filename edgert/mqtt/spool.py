"""Bounded SQLite store-and-forward spool for telemetry and events.

Records are kept in insertion order (the AUTOINCREMENT id) and deleted only when the broker
acknowledges them (:meth:`Spool.ack`). When full, the oldest records are dropped and counted.
A record the broker rejects is moved to a ``rejected`` table so it cannot block the rest.
A corrupt file is moved aside and rebuilt; the loss is counted in :meth:`Spool.stats`.
Thread-safe: the telemetry thread enqueues while the network thread acks.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert.errors import SyncError

__all__ = ["Record", "Spool"]

log = logging.getLogger("edgert.mqtt.spool")

#: Fraction of the spool freed when SQLite reports the disk (or page limit) full.
DISK_FULL_FREE_FRACTION = 0.1
#: Rejected records kept for inspection; older ones are deleted.
MAX_REJECTED = 1000
SQLITE_FULL = 13
_COUNTERS = ("dropped_full", "dropped_disk_full", "rejected", "rebuilds", "lost_on_rebuild", "lost_unknown")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,
    ts REAL NOT NULL, reason_code INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Record:
    """One spooled message: its id (order), topic, payload bytes and original wall-clock time."""

    id: int
    topic: str
    payload: bytes
    ts: float


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == SQLITE_FULL or "full" in str(exc).lower()


class Spool:
    """A bounded, ordered, crash-safe message spool in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_records: int,
        *,
        connect: Callable[[str], sqlite3.Connection] | None = None,
    ) -> None:
        if max_records < 1:
            raise SyncError(f"spool max_records must be >= 1, got {max_records}")
        self.path = Path(path)
        self.max_records = max_records
        self._connect = connect or (
            lambda p: sqlite3.connect(p, check_same_thread=False, isolation_level=None)
        )
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        #: Incremented on every rebuild; ids restart then, so readers holding a cursor must reset.
        self.generation = 0
        self._db = self._open()

    # -- opening and rebuilding -------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SyncError(f"cannot create spool directory {self.path.parent}: {exc.strerror}") from None
        try:
            db = self._open_checked()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                raise SyncError(
                    f"cannot open spool {self.path}: {exc}", hint="check the state directory's permissions"
                ) from None
            db = self._rebuild(str(exc))
        self._pending = int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
        return db

    def _open_checked(self) -> sqlite3.Connection:
        db = self._connect(str(self.path))
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
            for key, value in db.execute("SELECT key, value FROM meta"):
                if key in self._counters:
                    self._counters[key] = int(value)
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _rebuild(self, why: str) -> sqlite3.Connection:
        """Move a corrupt spool aside, count what it held (if readable) and start a fresh one."""
        lost = self._count_readable()
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        for suffix in ("", "-wal", "-shm"):
            src = Path(str(self.path) + suffix)
            if src.exists():
                os.replace(src, Path(str(aside) + suffix))
        log.warning(
            "telemetry spool was corrupt and has been rebuilt",
            extra={"spool": str(self.path), "moved_to": str(aside), "error": why, "lost_records": lost},
        )
        db = self._open_checked()
        self.generation += 1
        self._counters["rebuilds"] += 1
        if lost is None:
            self._counters["lost_unknown"] += 1
        else:
            self._counters["lost_on_rebuild"] += lost
        self._save_counters(db)
        return db

    def _count_readable(self) -> int | None:
        try:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
            finally:
                db.close()
        except sqlite3.Error:
            return None

    def _save_counters(self, db: sqlite3.Connection) -> None:
        db.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", self._counters.items())

    # -- operations -------------------------------------------------------------------------
    def enqueue(self, topic: str, payload: bytes, ts: float) -> int | None:
        """Append a record; drop the oldest when full. Return its id, or None if the disk is full."""
        with self._lock:
            try:
                return self._enqueue_locked(topic, payload, ts)
            except sqlite3.DatabaseError as exc:
                if _is_full(exc):
                    return self._enqueue_disk_full(topic, payload, ts)
                self._db.close()
                self._db = self._rebuild(str(exc))
                self._pending = 0
                return self._enqueue_locked(topic, payload, ts)

    def _enqueue_locked(self, topic: str, payload: bytes, ts: float) -> int:
        overflow = self._pending + 1 - self.max_records
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if overflow > 0:
                overflow = self._drop_oldest(overflow)
                self._counters["dropped_full"] += overflow
                self._save_counters(self._db)
            cur = self._db.execute(
                "INSERT INTO spool(topic, payload, ts) VALUES (?, ?, ?)", (topic, payload, ts)
            )
            self._db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        if overflow > 0:
            self._pending -= overflow
        self._pending += 1
        return int(cur.lastrowid or 0)

    def _rollback(self) -> None:
        # SQLite already rolls back on some errors (SQLITE_FULL); a second ROLLBACK would raise.
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _drop_oldest(self, n: int) -> int:
        cur = self._db.execute(
            "DELETE FROM spool WHERE id IN (SELECT id FROM spool ORDER BY id LIMIT ?)", (n,)
        )
        return int(cur.rowcount)

    def _enqueue_disk_full(self, topic: str, payload: bytes, ts: float) -> int | None:
        """Disk full: free the oldest tenth of the spool and retry once; else drop the new record."""
        n = max(1, int(self._pending * DISK_FULL_FREE_FRACTION))
        try:
            dropped = self._drop_oldest(n)
            self._pending -= dropped
            self._counters["dropped_disk_full"] += dropped
            rid = self._enqueue_locked(topic, payload, ts)
            self._save_counters(self._db)
            log.warning("spool disk full: dropped oldest records", extra={"dropped": dropped})
            return rid
        except sqlite3.DatabaseError as exc:
            self._counters["dropped_disk_full"] += 1
            log.warning("spool disk full: record dropped", extra={"error": str(exc)})
            return None

    def peek(self, after_id: int, limit: int) -> list[Record]:
        """Up to ``limit`` records with id > after_id, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, payload, ts FROM spool WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)
            ).fetchall()
        return [Record(int(r[0]), str(r[1]), bytes(r[2]), float(r[3])) for r in rows]

    def ack(self, record_id: int) -> None:
        """Delete a record the broker acknowledged (no-op if it was already dropped)."""
        with self._lock:
            cur = self._db.execute("DELETE FROM spool WHERE id = ?", (record_id,))
            self._pending -= cur.rowcount

    def ack_many(self, record_ids: list[int]) -> None:
        """Delete several acknowledged records in one transaction (the drain fast path)."""
        if not record_ids:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in record_ids])
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._pending -= cur.rowcount

    def last_id(self) -> int:
        """The highest id ever assigned (0 if none): records up to it were enqueued before now."""
        with self._lock:
            row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
        return int(row[0]) if row else 0

    def reject(self, record_id: int, reason_code: int, reason: str) -> None:
        """Move a record the broker refused to the ``rejected`` table so it cannot block the queue."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO rejected"
                    " SELECT id, topic, payload, ts, ?, ? FROM spool WHERE id = ?",
                    (reason_code, reason, record_id),
                )
                cur = self._db.execute("DELETE FROM spool WHERE id = ?", (record_id,))
                self._db.execute(
                    "DELETE FROM rejected WHERE id NOT IN (SELECT id FROM rejected ORDER BY id DESC LIMIT ?)",
                    (MAX_REJECTED,),
                )
                self._counters["rejected"] += cur.rowcount
                self._save_counters(self._db)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self._pending -= cur.rowcount

    def rejected(self, limit: int = 100) -> list[dict[str, Any]]:
        """The most recent rejected records with their reason codes, newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, topic, ts, reason_code, reason FROM rejected ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return [{"id": r[0], "topic": r[1], "ts": r[2], "reason_code": r[3], "reason": r[4]} for r in rows]

    @property
    def pending(self) -> int:
        """Records waiting for an acknowledgement."""
        return self._pending

    def stats(self) -> dict[str, int]:
        """Pending count and loss counters (dropped when full, disk full, rejected, rebuilds)."""
        with self._lock:
            return {"pending": self._pending, **self._counters}

    def close(self) -> None:
        """Persist counters and close the database."""
        with self._lock:
            try:
                self._save_counters(self._db)
            except sqlite3.Error:
                pass
            self._db.close()
