"""SQLite state files: a lock is not corruption, bounded retries on a lock, private file modes.

Shared by the telemetry spool and the command nonce store. SQLITE_BUSY / SQLITE_LOCKED mean that
another connection holds the file: transient, so wait and retry. Only a failed integrity check
(``PRAGMA quick_check``) or SQLITE_CORRUPT / SQLITE_NOTADB mean that the file is damaged.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

__all__ = [
    "BUSY_BACKOFF_S",
    "CorruptDatabase",
    "companion_files",
    "is_full",
    "retry_on_busy",
    "sqlite_is_busy",
    "sqlite_is_corrupt",
]

log = logging.getLogger("edgert.mqtt.sqlitedb")

#: Pause between attempts after a busy/locked error (SQLite's own busy_timeout waits first).
BUSY_BACKOFF_S = 0.2
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_CORRUPT, SQLITE_FULL, SQLITE_NOTADB = 5, 6, 11, 13, 26

T = TypeVar("T")


class CorruptDatabase(sqlite3.DatabaseError):
    """``PRAGMA quick_check`` did not answer ``ok``."""


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def sqlite_is_busy(exc: BaseException) -> bool:
    """True for SQLITE_BUSY / SQLITE_LOCKED: another connection holds the file (transient)."""
    code = _primary_code(exc)
    if code is not None:
        return code in (SQLITE_BUSY, SQLITE_LOCKED)
    text = str(exc).lower()
    return "database is locked" in text or "database table is locked" in text or "busy" in text


def sqlite_is_corrupt(exc: BaseException) -> bool:
    """True only for a failed integrity check or SQLITE_CORRUPT / SQLITE_NOTADB."""
    if isinstance(exc, CorruptDatabase):
        return True
    code = _primary_code(exc)
    if code is not None:
        return code in (SQLITE_CORRUPT, SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def is_full(exc: sqlite3.Error) -> bool:
    """True for SQLITE_FULL: the disk (or the page limit) is full."""
    code = _primary_code(exc)
    return code == SQLITE_FULL or "full" in str(exc).lower()


def retry_on_busy(fn: Callable[[], T], retries: int, *, what: str, backoff_s: float = BUSY_BACKOFF_S) -> T:
    """Call ``fn``; on SQLITE_BUSY/LOCKED call it again up to ``retries`` more times, then re-raise."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            if not sqlite_is_busy(exc) or attempt == retries:
                raise
            log.info("database is locked by another connection; retrying",
                     extra={"file": what, "attempt": attempt + 1, "of": retries})
            time.sleep(backoff_s)
    raise AssertionError("unreachable")


def companion_files(path: Path) -> list[Path]:
    """The ``-wal`` and ``-shm`` files SQLite keeps next to a WAL database."""
    return [Path(f"{path}-wal"), Path(f"{path}-shm")]
