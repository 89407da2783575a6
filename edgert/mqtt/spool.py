"""Bounded SQLite store-and-forward spool for telemetry and events.

Records are kept in insertion order (the AUTOINCREMENT id) and deleted only when the broker
acknowledges them (:meth:`Spool.ack`). When full, the oldest records are dropped and counted.
A record the broker rejects is moved to a ``rejected`` table so it cannot block the rest.
Thread-safe: the telemetry thread enqueues while the network thread acks.

A *locked* file is not a corrupt one: when another process holds the database, SQLite waits
(``busy_timeout``) and the spool retries a bounded number of times; past that, writes wait in a
bounded in-memory backlog, in order, and are applied by the next write that gets through. Only a
failed ``quick_check`` or an SQLITE_CORRUPT / SQLITE_NOTADB error counts as corruption: then the
file is set aside (a bounded number of copies, bounded in bytes) and rebuilt, and the loss is
counted in :meth:`Spool.stats`. The file and its ``-wal``/``-shm`` are mode 0600 and the
directory 0700, whatever the umask.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from edgert.errors import SyncError
from edgert.mqtt.sqlitedb import (
    CorruptDatabase,
    companion_files,
    is_full,
    retry_on_busy,
    sqlite_is_busy,
    sqlite_is_corrupt,
)
from edgert.security.atomic import (
    aside_byte_limit,
    create_private_file,
    ensure_private_dir,
    set_aside,
    tighten_files,
)

__all__ = ["Record", "Spool"]

log = logging.getLogger("edgert.mqtt.spool")

#: Fraction of the spool freed when SQLite reports the disk (or page limit) full.
DISK_FULL_FREE_FRACTION = 0.1
#: Rejected records kept for inspection; older ones are deleted.
MAX_REJECTED = 1000
#: Seconds SQLite itself waits for a lock held by another connection (``PRAGMA busy_timeout``).
BUSY_TIMEOUT_S = 5.0
#: Further attempts after a busy/locked error, each waiting ``BUSY_TIMEOUT_S`` again: with the
#: defaults a lock held for up to about 20 s costs nothing; longer ones park writes in memory.
BUSY_RETRIES = 3
#: Writes kept in memory while the file stays locked past the retries; beyond either bound the
#: oldest waiting records are dropped and counted (``dropped_busy``).
MAX_BACKLOG_RECORDS = 1000
MAX_BACKLOG_BYTES = 4 * 1024 * 1024
#: Copies of a corrupt spool kept for inspection (``telemetry.sqlite.corrupt-<time>``), newest first.
MAX_CORRUPT_COPIES = 2
#: Bytes those copies may take in all, and at most this fraction of the file system's size.
MAX_CORRUPT_BYTES = 16 * 1024 * 1024
MAX_CORRUPT_DISK_FRACTION = 0.1
#: WAL pages before an automatic checkpoint, and the size the WAL is truncated to afterwards: keeps
#: the write-ahead log from taking several MB on a small state disk (SQLite's default is 1000 pages).
WAL_AUTOCHECKPOINT_PAGES = 256
JOURNAL_SIZE_LIMIT_BYTES = 1024 * 1024

_COUNTERS = (
    "dropped_full",
    "dropped_disk_full",
    "dropped_busy",
    "rejected",
    "rebuilds",
    "lost_on_rebuild",
    "lost_unknown",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL,
    payload BLOB NOT NULL, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (id INTEGER PRIMARY KEY, topic TEXT NOT NULL, payload BLOB NOT NULL,
    ts REAL NOT NULL, reason_code INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

T = TypeVar("T")


@dataclass(frozen=True)
class Record:
    """One spooled message: its id (order), topic, payload bytes and original wall-clock time."""

    id: int
    topic: str
    payload: bytes
    ts: float


@dataclass(frozen=True, eq=False)
class _Op:
    """A write waiting for the file: ``insert`` (topic, payload, ts), ``ack`` (ids) or ``reject``."""

    kind: str
    topic: str = ""
    payload: bytes = b""
    ts: float = 0.0
    ids: tuple[int, ...] = ()
    reason_code: int = 0
    reason: str = ""


class Spool:
    """A bounded, ordered, crash-safe message spool in one SQLite file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_records: int,
        *,
        connect: Callable[[str], sqlite3.Connection] | None = None,
        busy_timeout_s: float = BUSY_TIMEOUT_S,
        busy_retries: int = BUSY_RETRIES,
        max_corrupt_copies: int = MAX_CORRUPT_COPIES,
        max_corrupt_bytes: int = MAX_CORRUPT_BYTES,
    ) -> None:
        if max_records < 1:
            raise SyncError(f"spool max_records must be >= 1, got {max_records}")
        self.path = Path(path)
        self.max_records = max_records
        self.busy_timeout_s = busy_timeout_s
        self.busy_retries = max(0, busy_retries)
        self.max_corrupt_copies = max_corrupt_copies
        self.max_corrupt_bytes = max_corrupt_bytes
        self._connect = connect or (
            lambda p: sqlite3.connect(p, check_same_thread=False, isolation_level=None)
        )
        self._lock = threading.Lock()
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._backlog: collections.deque[_Op] = collections.deque()
        self._backlog_bytes = 0
        self._backlog_records = 0
        self._last_id = 0
        #: Incremented on every rebuild; ids restart then, so readers holding a cursor must reset.
        self.generation = 0
        self._db = self._open()

    # -- opening and rebuilding -------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            ensure_private_dir(self.path.parent)
        except OSError as exc:
            raise SyncError(f"cannot create spool directory {self.path.parent}: {exc.strerror}") from None
        try:
            db = self._retrying(self._open_checked, self.busy_retries)
        except sqlite3.DatabaseError as exc:
            if sqlite_is_corrupt(exc):
                db = self._rebuild(str(exc))
            elif sqlite_is_busy(exc):
                raise SyncError(
                    f"spool {self.path} is locked by another process ({exc})",
                    hint="stop the process holding it (an sqlite3 shell, a backup tool), then start again",
                ) from None
            else:
                raise SyncError(
                    f"cannot open spool {self.path}: {exc}",
                    hint="check the state directory's permissions and free space",
                ) from None
        except OSError as exc:
            raise SyncError(
                f"cannot open spool {self.path}: {exc.strerror}",
                hint="check the state directory's permissions",
            ) from None
        return db

    def _open_checked(self) -> sqlite3.Connection:
        # Created 0600 before SQLite opens it; SQLite gives -wal/-shm the same mode.
        create_private_file(self.path)
        db = self._connect(str(self.path))
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_s * 1000)}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT_BYTES}")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise CorruptDatabase("quick_check failed")
            for key, value in db.execute("SELECT key, value FROM meta"):
                if key in self._counters:
                    self._counters[key] = int(value)
            self._pending = int(db.execute("SELECT count(*) FROM spool").fetchone()[0])
            row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'spool'").fetchone()
            self._last_id = int(row[0]) if row else 0
        except sqlite3.DatabaseError:
            db.close()
            raise
        tighten_files(companion_files(self.path))  # left by an older version with the umask's mode
        return db

    def _rebuild(self, why: str) -> sqlite3.Connection:
        """Set a corrupt spool aside (bounded copies), count what it held (if readable), start afresh."""
        lost = self._count_readable()
        limit = aside_byte_limit(self.path.parent, self.max_corrupt_bytes, MAX_CORRUPT_DISK_FRACTION)
        aside = set_aside(self.path, max_copies=self.max_corrupt_copies, max_bytes=limit)
        log.warning(
            "telemetry spool was corrupt and has been rebuilt",
            extra={
                "spool": str(self.path),
                "moved_to": str(aside) if aside else "(deleted: over the size bound for copies)",
                "error": why[:200],
                "lost_records": lost,
            },
        )
        db = self._open_checked()
        self.generation += 1
        self._counters["rebuilds"] += 1
        if lost is None:
            self._counters["lost_unknown"] += 1
        else:
            self._counters["lost_on_rebuild"] += lost
        self._save_counters(db)
        # Waiting acks and rejects name ids of the old file; waiting records are still to be written.
        for op in [op for op in self._backlog if op.kind != "insert"]:
            self._backlog_remove(op)
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

    def _retrying(self, fn: Callable[[], T], retries: int) -> T:
        return retry_on_busy(fn, retries, what=str(self.path))

    # -- writes: applied in order, or kept in the backlog while the file is locked -----------
    def _submit(self, op: _Op) -> int | None:
        """Queue ``op`` behind any waiting writes and apply them in order; the id of an insert, or None."""
        episode = bool(self._backlog)
        self._backlog_push(op)
        result: int | None = None
        rebuilt = False
        # In a lock episode each new write tries once (SQLite still waits busy_timeout), not the full budget.
        retries = 0 if episode else self.busy_retries
        while self._backlog:
            head = self._backlog[0]
            try:
                rid = self._retrying(functools.partial(self._apply, head), retries)
            except sqlite3.DatabaseError as exc:
                if sqlite_is_corrupt(exc) and not rebuilt:
                    rebuilt = True
                    self._db.close()
                    self._db = self._rebuild(str(exc))
                    continue
                if head.kind != "insert" and is_full(exc):
                    # Deleting needs room in the WAL too: forget the ack; the record is sent again later
                    # (QoS 1 is at-least-once) and never blocks the disk-full handling of new records.
                    self._backlog_remove(head)
                    continue
                if not episode:
                    log.warning(
                        "spool cannot be written now; writes wait in memory, in order",
                        extra={"spool": str(self.path), "error": str(exc)[:200], "busy": sqlite_is_busy(exc),
                               "waiting": len(self._backlog)},
                    )
                return None
            self._backlog_remove(head)
            if head is op:
                result = rid
        if episode:
            log.info("spool writable again; waiting writes applied", extra={"spool": str(self.path)})
        return result

    def _backlog_push(self, op: _Op) -> None:
        self._backlog.append(op)
        self._backlog_bytes += len(op.payload)
        self._backlog_records += op.kind == "insert"
        while self._backlog_records > 1 and (
            self._backlog_records > MAX_BACKLOG_RECORDS or self._backlog_bytes > MAX_BACKLOG_BYTES
        ):
            oldest = next(o for o in self._backlog if o.kind == "insert")
            self._backlog_remove(oldest)
            self._counters["dropped_busy"] += 1

    def _backlog_remove(self, op: _Op) -> None:
        self._backlog.remove(op)
        self._backlog_bytes -= len(op.payload)
        self._backlog_records -= op.kind == "insert"

    def _apply(self, op: _Op) -> int | None:
        if op.kind == "insert":
            try:
                return self._enqueue_locked(op.topic, op.payload, op.ts)
            except sqlite3.DatabaseError as exc:
                if is_full(exc):
                    return self._enqueue_disk_full(op.topic, op.payload, op.ts)
                raise
        if op.kind == "ack":
            self._ack_locked(op.ids)
        else:
            self._reject_locked(op.ids[0], op.reason_code, op.reason)
        return None

    def enqueue(self, topic: str, payload: bytes, ts: float) -> int | None:
        """Append a record; drop the oldest when full. Return its id, or None if not written now.

        None means either the disk was full (the record was dropped and counted in
        ``dropped_disk_full``) or the file is locked by another process (the record waits in memory
        and is written, in order, by the next write that gets through).
        """
        with self._lock:
            return self._submit(_Op("insert", topic=topic, payload=bytes(payload), ts=ts))

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
        self._last_id = int(cur.lastrowid or 0)
        return self._last_id

    def _rollback(self) -> None:
        # SQLite already rolls back on some errors (SQLITE_FULL); a second ROLLBACK would raise.
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # nothing was committed; the next write starts a fresh transaction

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
            if sqlite_is_busy(exc) or sqlite_is_corrupt(exc):
                raise
            self._counters["dropped_disk_full"] += 1
            log.warning("spool disk full: record dropped", extra={"error": str(exc)})
            return None

    def peek(self, after_id: int, limit: int) -> list[Record]:
        """Up to ``limit`` records with id > after_id, oldest first ([] while the file is locked)."""
        with self._lock:
            try:
                rows = self._retrying(
                    lambda: self._db.execute(
                        "SELECT id, topic, payload, ts FROM spool WHERE id > ? ORDER BY id LIMIT ?",
                        (after_id, limit),
                    ).fetchall(),
                    0,
                )
            except sqlite3.DatabaseError as exc:
                if not sqlite_is_busy(exc):
                    raise
                return []
        return [Record(int(r[0]), str(r[1]), bytes(r[2]), float(r[3])) for r in rows]

    def ack(self, record_id: int) -> None:
        """Delete a record the broker acknowledged (no-op if it was already dropped)."""
        self.ack_many([record_id])

    def ack_many(self, record_ids: list[int]) -> None:
        """Delete several acknowledged records in one transaction (waits in memory if the file is locked)."""
        if not record_ids:
            return
        with self._lock:
            self._submit(_Op("ack", ids=tuple(record_ids)))

    def _ack_locked(self, record_ids: tuple[int, ...]) -> None:
        if not record_ids:
            return
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
            return self._last_id

    def reject(self, record_id: int, reason_code: int, reason: str) -> None:
        """Move a record the broker refused to the ``rejected`` table so it cannot block the queue."""
        with self._lock:
            self._submit(_Op("reject", ids=(record_id,), reason_code=reason_code, reason=reason))

    def _reject_locked(self, record_id: int, reason_code: int, reason: str) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO rejected SELECT id, topic, payload, ts, ?, ? FROM spool WHERE id = ?",
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
        """Records waiting for an acknowledgement (including any waiting in memory for a locked file)."""
        return self._pending + self._backlog_records

    def stats(self) -> dict[str, int]:
        """Pending count and loss counters (full, disk full, locked too long, rejected, rebuilds)."""
        with self._lock:
            return {"pending": self.pending, **self._counters}

    def close(self) -> None:
        """Apply any waiting writes (one attempt), persist counters and close the database."""
        with self._lock:
            if self._backlog:
                self._submit(_Op("ack"))  # an empty ack: flushes the backlog once, changes nothing
                waiting = self._backlog_records
                if waiting:
                    self._counters["dropped_busy"] += waiting
                    log.error(
                        "spool still locked at close; records waiting in memory are lost",
                        extra={"spool": str(self.path), "lost_records": waiting},
                    )
            try:
                self._save_counters(self._db)
            except sqlite3.Error:
                pass
            self._db.close()
