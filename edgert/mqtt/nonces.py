"""A command nonce store that survives daemon restarts (SQLite), so a captured command cannot be
replayed after a restart while it is still valid.

Every accepted nonce is committed (``synchronous=FULL``) *before* the command runs, so a crash
right after a command cannot forget it. Rows are pruned once the command they belong to has
expired (plus the tolerated clock skew); the table is bounded and a full table refuses new
commands rather than evicting live nonces. If the file is corrupt (a failed integrity check,
SQLITE_CORRUPT or SQLITE_NOTADB) it is set aside (bounded copies) and rebuilt, and a *floor* is
stored: commands issued before the rebuild (``iat`` earlier than the rebuild time plus the clock
skew) are refused, because their nonces may have been lost. A file locked by another process is
not corrupt: opening it waits and retries. A store that cannot be written (disk full, read-only,
locked) refuses commands: it fails closed. The file and its ``-wal``/``-shm`` are mode 0600.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from edgert.errors import SyncError
from edgert.mqtt.signing import CLOCK_SKEW_S, MAX_NONCES, CommandRejected
from edgert.mqtt.spool import MAX_CORRUPT_BYTES, MAX_CORRUPT_COPIES, MAX_CORRUPT_DISK_FRACTION
from edgert.mqtt.sqlitedb import (
    CorruptDatabase,
    companion_files,
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

__all__ = ["NONCE_FILE", "PersistentNonceCache"]

log = logging.getLogger("edgert.mqtt.nonces")

#: File name of the nonce store, kept next to the telemetry spool under the state directory.
NONCE_FILE = "command-nonces.sqlite"
#: Seconds to wait on a locked database (another process holding it) before failing closed.
BUSY_TIMEOUT_S = 2.0
#: Further attempts to *open* a locked store (each waits ``BUSY_TIMEOUT_S``) before giving up.
OPEN_BUSY_RETRIES = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS nonces (nonce TEXT PRIMARY KEY, exp REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS nonces_exp ON nonces(exp);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""


class PersistentNonceCache:
    """Nonces of accepted commands and their expiry, in one SQLite file; refuses a nonce twice."""

    def __init__(self, path: str | os.PathLike[str], *, now: float, max_entries: int = MAX_NONCES) -> None:
        self.path = Path(path)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self.rebuilt = False
        self._floor = 0.0
        self._db = self._open(now)
        row = self._db.execute("SELECT value FROM meta WHERE key = 'floor'").fetchone()
        self._floor = float(row[0]) if row else 0.0

    def _open(self, now: float) -> sqlite3.Connection:
        try:
            ensure_private_dir(self.path.parent)
        except OSError as exc:
            raise SyncError(
                f"cannot create {self.path.parent} for the command nonce store: {exc.strerror}",
                hint="check the state directory's permissions",
            ) from None
        try:
            return retry_on_busy(self._open_checked, OPEN_BUSY_RETRIES, what=str(self.path))
        except sqlite3.DatabaseError as exc:
            if sqlite_is_corrupt(exc):
                return self._rebuild(now, str(exc))
            hint = (
                "stop the process holding it (an sqlite3 shell, a backup tool), then start again"
                if sqlite_is_busy(exc)
                else "check the state directory's permissions and free space"
            )
            raise SyncError(f"cannot open the command nonce store {self.path}: {exc}", hint=hint) from None
        except OSError as exc:
            raise SyncError(
                f"cannot open the command nonce store {self.path}: {exc.strerror}",
                hint="check the state directory's permissions",
            ) from None

    def _open_checked(self) -> sqlite3.Connection:
        # Created 0600 before SQLite opens it; SQLite gives -wal/-shm the same mode.
        create_private_file(self.path)
        db = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None, timeout=BUSY_TIMEOUT_S
        )
        try:
            # A nonce must be on disk before its command runs: FULL survives a power loss.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise CorruptDatabase("quick_check failed")
        except sqlite3.DatabaseError:
            db.close()
            raise
        tighten_files(companion_files(self.path))  # left by an older version with the umask's mode
        return db

    def _rebuild(self, now: float, why: str) -> sqlite3.Connection:
        limit = aside_byte_limit(self.path.parent, MAX_CORRUPT_BYTES, MAX_CORRUPT_DISK_FRACTION)
        aside = set_aside(self.path, max_copies=MAX_CORRUPT_COPIES, max_bytes=limit, now=now)
        db = self._open_checked()
        # Nonces seen before now are lost: refuse anything issued before now (+ skew) from here on.
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('floor', ?)", (now + CLOCK_SKEW_S,))
        self.rebuilt = True
        log.warning(
            "command nonce store was unreadable and has been rebuilt; older commands are refused",
            extra={
                "store": str(self.path),
                "moved_to": str(aside) if aside else "(deleted: over the size bound for copies)",
                "error": why[:200],
            },
        )
        return db

    @property
    def floor(self) -> float:
        """Commands with ``iat`` before this (unix seconds) are refused; 0 unless the store was rebuilt."""
        return self._floor

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM nonces").fetchone()[0])

    def check_and_add(self, nonce: str, exp: float, now: float, *, iat: float | None = None) -> None:
        """Record ``nonce`` (valid until ``exp``); raise CommandRejected if seen before or unsafe."""
        if iat is not None and iat < self._floor:
            raise CommandRejected("replayed", "command predates a rebuild of the nonce store; send a new one")
        with self._lock:
            try:
                self._add_locked(nonce, exp, now)
            except sqlite3.IntegrityError:
                self._rollback()
                raise CommandRejected("replayed", "command nonce was already used (replay refused)") from None
            except sqlite3.Error as exc:
                self._rollback()
                log.error(
                    "command nonce store cannot be written; refusing commands",
                    extra={"store": str(self.path), "error": str(exc)[:200]},
                )
                raise CommandRejected(
                    "busy", "the device cannot record the command nonce; retry later"
                ) from None

    def _add_locked(self, nonce: str, exp: float, now: float) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.execute("DELETE FROM nonces WHERE exp + ? < ?", (CLOCK_SKEW_S, now))
        if db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone():
            raise sqlite3.IntegrityError("nonce seen")
        if int(db.execute("SELECT count(*) FROM nonces").fetchone()[0]) >= self.max_entries:
            db.execute("ROLLBACK")
            # Never evict live nonces: that would reopen the replay window.
            raise CommandRejected("busy", "too many live commands; retry later")
        db.execute("INSERT INTO nonces(nonce, exp) VALUES (?, ?)", (nonce, exp))
        db.execute("COMMIT")

    def _rollback(self) -> None:
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            pass  # SQLite already rolled back (or the connection is gone): nothing was committed

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
