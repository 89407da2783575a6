"""Append-only, hash-chained audit log: signed checkpoints, a signed head, retention, flood control.

Each line is one canonical-JSON record ``{"i", "ts", "event", "data", "prev", "h"}`` (format and
verification in :mod:`edgert.security.audit_chain`). Every ``checkpoint_every`` records, and on
:meth:`AuditLog.close`, a ``checkpoint`` record carries an Ed25519 signature over its position and
``prev``. After each checkpoint is fsynced, ``head.json`` (its index and hash, signed; 0600) is
replaced atomically, so a log cut back to an earlier point no longer reaches its head. A writer
that finds the log behind what it (or the head file) knew appends a signed ``audit_gap`` record, so
the next write cannot hide a truncation by moving the head.

Files rotate by size and the chain carries across them. **Retention**: the directory stays under
``max_total_bytes``; the oldest rotated files are deleted, each only after a signed
``audit_pruned`` record names its first/last index and hash, so ``verify`` can tell retention from
deletion. :class:`RefusalAggregator` keeps a flood of refused untrusted input (unsigned MQTT
commands) to a few records per reason and interval.

Appends are thread-safe (a lock) and process-safe (``flock``); they flush but do not fsync,
except checkpoints, to stay cheap on the request path. Values that look like secrets are
redacted and raw bytes or tensors are refused, so the log never holds either.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.errors import StoreError
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.audit_chain import (
    ANCHORED,
    FILE_PATTERN,
    GAP_EVENT,
    GENESIS,
    HEAD_FILE,
    HEAD_MISSING_EVENT,
    PRUNED_EVENT,
    VerifyReport,
    canonical,
    checkpoint_message,
    first_line,
    last_line,
    list_files,
    make_head,
    read_head,
    read_lines,
    read_records,
    record_hash,
    verify_dir,
    verify_head,
    verify_lines,
)

__all__ = ["AUDIT_BUDGET_BYTES", "GENESIS", "REFUSAL_INTERVAL_S", "AuditLog", "RefusalAggregator",
           "VerifyReport", "is_refusal", "read_lines", "read_records", "record_hash", "verify_dir",
           "verify_lines"]

log = logging.getLogger("edgert.security.audit")

#: Rotate before the current file would pass this size.
MAX_FILE_BYTES = 4 << 20
#: Sign a checkpoint after this many records.
CHECKPOINT_EVERY = 256
#: Disk budget of the whole audit directory (sized for a small device; rotated files are pruned).
AUDIT_BUDGET_BYTES = 64 << 20
#: Smallest budget accepted.
MIN_BUDGET_BYTES = 32 << 10
#: The budget holds at least this many files (files shrink below MAX_FILE_BYTES for small budgets).
FILES_PER_BUDGET = 4
#: Part of the budget kept for the head file, its temporary copy and the lock file.
HEAD_RESERVE_BYTES = 4 << 10
#: Refusals of untrusted input are aggregated per (event, reason) over this interval (s, monotonic).
REFUSAL_INTERVAL_S = 60.0
#: Distinct (event, reason) pairs aggregated at once; further reasons share one ``(other)`` summary.
REFUSAL_MAX_KEYS = 64
#: Events named like this are refusals, which whoever sends the input can repeat at will.
REFUSAL_SUFFIXES = (".refused", ".rejected")
#: With unsigned records pending, the aggregator signs a checkpoint (and head) at least this often (s).
CHECKPOINT_INTERVAL_S = 300.0
#: How often the aggregator's background thread writes due summaries and checkpoints (s).
TICK_S = 5.0
OTHER_REASON = "(other)"
_SUMMARY_FIELDS = frozenset({"reason", "count", "aggregated", "window_s"})
_SECRET_NAME = re.compile(r"secret|passw|token|private|credential|plaintext", re.IGNORECASE)
REDACTED = "[redacted]"


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return bool(_SECRET_NAME.search(lowered)) or (
        (lowered == "key" or lowered.endswith("_key")) and "public" not in lowered)


def _clean(name: str, value: Any) -> Any:
    """Redact secret-looking fields; refuse raw bytes and tensors; keep plain JSON values."""
    if _is_secret_name(name):
        return REDACTED
    if isinstance(value, (bytes, bytearray, memoryview)) or hasattr(value, "__array__"):
        raise ValueError(f"audit field {name!r} holds raw bytes or a tensor; log a hash or a size instead")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)  # floats are not canonical in JSON; keep their text
    if isinstance(value, (list, tuple)):
        return [_clean(name, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(str(k), v) for k, v in value.items()}
    return str(value)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class AuditLog:
    """Append events; call :meth:`close` (or use as a context manager) to sign a final checkpoint.

    ``max_total_bytes`` is the disk budget of the directory: the oldest rotated files are pruned
    (with a signed ``audit_pruned`` record each) so that appends keep working when it is reached.
    """

    def __init__(self, directory: Path, signer: ed25519.Ed25519PrivateKey | None = None, *,
                 max_bytes: int = MAX_FILE_BYTES, checkpoint_every: int = CHECKPOINT_EVERY,
                 clock: Callable[[], float] = time.time, max_total_bytes: int = AUDIT_BUDGET_BYTES) -> None:
        if max_total_bytes < MIN_BUDGET_BYTES:
            raise ValueError(f"audit log budget {max_total_bytes} bytes is below the minimum "
                             f"{MIN_BUDGET_BYTES} bytes; give a larger max_total_bytes")
        self.directory = ensure_private_dir(Path(directory))
        self.signer = signer
        self.max_total_bytes = max_total_bytes
        self.max_bytes = max(1, min(max_bytes, (max_total_bytes - HEAD_RESERVE_BYTES) // FILES_PER_BUDGET))
        self.checkpoint_every = checkpoint_every
        self.clock = clock
        self._fs = FileSystem()
        self._lock = threading.Lock()
        self._lock_fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._next_index = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        with self._flocked():
            self._open_latest()
            self._check_head_file()
            if self._rotated_bytes() + self.max_bytes + HEAD_RESERVE_BYTES > self.max_total_bytes:
                if self._size:  # over budget at open: the budget was lowered, or logs predate retention
                    self._rotate()
                else:
                    self._enforce_budget()

    @property
    def unsigned(self) -> int:
        """Records this writer appended since the last checkpoint."""
        return self._since_checkpoint

    def head(self) -> dict[str, Any] | None:
        """The newest signed head ``{v, seq, hash, ts, sig}`` (the fleet should keep a copy), or None."""
        try:
            return read_head(self.directory)
        except (OSError, ValueError):
            return None

    # ---- file handling -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _flocked(self) -> Iterator[None]:
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _open_file(self, path: Path) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._path = path
        self._size = os.fstat(self._fd).st_size

    def _open_latest(self) -> None:
        """Open the newest file and take the chain head from the newest record on disk."""
        files = list_files(self.directory)
        self._head, self._next_index = GENESIS, 0
        for path in reversed(files):  # the newest file with a record holds the chain head
            line, end = last_line(path)
            if path.stat().st_size != end:
                os.truncate(path, end)  # drop a partial line left by a crash mid-write
            if line is not None:
                record = json.loads(line)
                self._head, self._next_index = record["h"], int(record["i"]) + 1
                break
        self._open_file(files[-1] if files else self.directory / "audit-000001.jsonl")

    def _check_head_file(self) -> None:
        """At open: note a log that is behind its signed head, or a head file that is missing."""
        if self.signer is None:
            return
        try:
            head = read_head(self.directory)
            problem = None if head is None else verify_head(head, self.signer.public_key())
        except (OSError, ValueError) as exc:
            head, problem = None, f"unreadable: {exc}"
        if head is not None and problem is None:
            if head["seq"] >= self._next_index:
                self._note_gap(head["seq"], str(head["hash"]), "head file")
            return
        if self._next_index > 0:
            log.error("the audit head file is missing or invalid", extra={"problem": problem})
            self._append(HEAD_MISSING_EVENT, {"last": self._next_index - 1, "problem": problem})
        self._checkpoint()  # anchor: a new log starts with a checkpoint, so a prefix cannot shed its head

    def _note_gap(self, expected_seq: int, expected_h: str, source: str) -> None:
        found = self._next_index - 1
        log.error("the audit log was cut back", extra={"expected_seq": expected_seq, "found_last": found})
        self._append(GAP_EVENT, {"expected_seq": expected_seq, "expected_h": expected_h,
                                 "found_last": found, "source": source})
        if self.signer is not None:
            self._checkpoint()

    def _sync_with_disk(self) -> None:
        """Pick up records or files another process wrote; note records that vanished since."""
        assert self._fd is not None and self._path is not None
        st = os.fstat(self._fd)
        match = FILE_PATTERN.match(self._path.name)
        assert match is not None
        newer = self._path.with_name(f"audit-{int(match.group(1)) + 1:06d}.jsonl")
        if st.st_nlink == 0 or st.st_size != self._size or newer.exists():
            known_next, known_head = self._next_index, self._head
            self._open_latest()
            if self._next_index < known_next or (self._next_index == known_next and self._head != known_head):
                self._note_gap(known_next - 1, known_head, "writer")

    def _rotated_bytes(self) -> int:
        total = 0
        for path in list_files(self.directory):
            if path != self._path:
                with contextlib.suppress(FileNotFoundError):
                    total += path.stat().st_size
        return total

    def _rotate(self) -> None:
        assert self._path is not None
        match = FILE_PATTERN.match(self._path.name)
        assert match is not None
        self._open_file(self.directory / f"audit-{int(match.group(1)) + 1:06d}.jsonl")
        self._enforce_budget()

    def _enforce_budget(self) -> None:
        """Prune the oldest rotated files until they and a full current file fit the budget."""
        rotated = [p for p in list_files(self.directory) if p != self._path]
        total = self._rotated_bytes()
        while rotated and total + self.max_bytes + HEAD_RESERVE_BYTES > self.max_total_bytes:
            path = rotated.pop(0)
            total -= self._prune(path)

    def _prune(self, path: Path) -> int:
        """Record (and sign) what ``path`` held, then delete it; return its size."""
        size = path.stat().st_size
        first, (last, _end) = first_line(path), last_line(path)
        if first is not None and last is not None:
            try:
                a, b = json.loads(first), json.loads(last)
                data = {"file": path.name, "first": a["i"], "first_h": a["h"], "last": b["i"],
                        "last_h": b["h"], "bytes": size}
            except (ValueError, KeyError, TypeError):
                data = {"file": path.name, "bytes": size, "unparsable": True}
            self._append(PRUNED_EVENT, data, may_rotate=False)
            if self.signer is not None:
                self._checkpoint(may_rotate=False)  # the claim is signed before the file goes
            elif self._fd is not None:
                os.fsync(self._fd)
            log.info("audit log pruned to stay under its disk budget", extra=data)
        self._fs.remove(path, step="prune")
        return size

    # ---- appending ---------------------------------------------------------------------------
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (thread- and process-safe) and return the record written."""
        data = {k: _clean(k, v) for k, v in fields.items()}
        with self._lock:
            self._require_open()
            with self._flocked():
                self._sync_with_disk()
                record = self._append(event, data)
                if self.signer is not None and self._since_checkpoint >= self.checkpoint_every:
                    self._checkpoint()
        return record

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head now and refresh the head file (no-op without a signing key)."""
        if self.signer is None:
            return None
        with self._lock:
            self._require_open()
            with self._flocked():
                self._sync_with_disk()
                return self._checkpoint()

    def _require_open(self) -> None:
        if self._fd is None:
            raise StoreError("the audit log is closed")

    def _checkpoint(self, *, may_rotate: bool = True) -> dict[str, Any]:
        assert self.signer is not None and self._fd is not None
        record = self._append("checkpoint", None, may_rotate=may_rotate)
        os.fsync(self._fd)  # checkpoints are the durable points of the log; the head never runs ahead
        head = make_head(record, self.signer)
        try:
            self._fs.atomic_write(self.directory / HEAD_FILE, [canonical(head) + b"\n"], mode=0o600,
                                  step="head")
        except OSError as exc:  # an older head stays; it is still consistent with the log
            log.warning("cannot write the audit head file", extra={"error": exc.strerror})
        return record

    def _build(self, event: str, data: dict[str, Any] | None) -> tuple[dict[str, Any], bytes]:
        record: dict[str, Any] = {"i": self._next_index, "ts": _iso(self.clock()), "event": event,
                                  "prev": self._head}
        if data is None:
            assert self.signer is not None
            signature = self.signer.sign(checkpoint_message(self._next_index, self._head))
            data = {"sig": base64.b64encode(signature).decode("ascii"), ANCHORED: True}
        record["data"] = data
        record["h"] = record_hash(record)
        return record, canonical(record) + b"\n"

    def _append(self, event: str, data: dict[str, Any] | None, *, may_rotate: bool = True) -> dict[str, Any]:
        """Write one record (``data`` None: a signed checkpoint); flock held."""
        assert self._fd is not None
        record, line = self._build(event, data)
        if may_rotate and self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
            record, line = self._build(event, data)
        try:
            os.write(self._fd, line)
        except OSError as exc:
            raise StoreError(f"cannot append to the audit log: {exc.strerror}",
                             hint="free disk space in the state directory") from exc
        self._size += len(line)
        self._head, self._next_index = record["h"], self._next_index + 1
        self._since_checkpoint = 0 if data is None else self._since_checkpoint + 1
        return record

    def close(self) -> None:
        """Sign a final checkpoint (if anything is unsigned) and close the files."""
        with self._lock:
            if self._fd is None:
                return
            if self.signer is not None and self._since_checkpoint > 0:
                with self._flocked():
                    self._sync_with_disk()
                    self._checkpoint()
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- flood control -----------------------------------------------------------------------------

def is_refusal(event: str) -> bool:
    """True for events that record refused untrusted input (names ending in .refused or .rejected)."""
    return event.endswith(REFUSAL_SUFFIXES)


@dataclass
class _Window:
    started: float
    last: float
    count: int = 0  # refusals after the first one, which was written as it came
    sums: dict[str, int] = field(default_factory=dict)


class RefusalAggregator:
    """The audit log's front for untrusted traffic: refusals aggregated, everything else one by one.

    The first refusal per (event, reason) in an interval is written as it comes (with ``count``
    1); the rest are counted, and one summary record (same event, ``count``, ``aggregated``: true,
    integer fields summed) is written when the interval has passed, on :meth:`flush` or on
    :meth:`close`. Every other event is appended at once. A background thread (:meth:`start`)
    writes due summaries and, while records are unsigned, a checkpoint every
    ``checkpoint_interval_s``, so the head the fleet sees stays fresh. Time is ``clock`` (monotonic).
    """

    def __init__(self, log: AuditLog, *, interval_s: float = REFUSAL_INTERVAL_S,
                 checkpoint_interval_s: float = CHECKPOINT_INTERVAL_S, tick_s: float = TICK_S,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = REFUSAL_MAX_KEYS,
                 refusal: Callable[[str], bool] = is_refusal) -> None:
        self.log = log
        self.interval_s, self.checkpoint_interval_s, self.tick_s = interval_s, checkpoint_interval_s, tick_s
        self.clock, self.max_keys, self.refusal = clock, max_keys, refusal
        self.aggregated = 0  # refusals folded into summaries so far
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()
        self._last_checkpoint = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the background thread that writes due summaries and checkpoints."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="edgert-audit", daemon=True)
            self._thread.start()

    def event(self, name: str, **fields: Any) -> None:
        """Record one event: refusals through the aggregation, all others at once."""
        now = self.clock()
        with self._lock:
            self._flush(now, everything=False)
            if not self.refusal(name):
                self.log.append(name, **fields)
                return
            key = (name, str(fields.get("reason", "")))
            if key not in self._windows and len(self._windows) >= self.max_keys:
                key = (name, OTHER_REASON)
            window = self._windows.get(key)
            if window is None:
                self._windows[key] = _Window(now, now)
                self.log.append(name, **{**fields, "count": 1})
                return
            window.count += 1
            window.last = now
            for k, v in fields.items():
                if isinstance(v, int) and not isinstance(v, bool) and k not in _SUMMARY_FIELDS:
                    window.sums[k] = window.sums.get(k, 0) + v

    def tick(self) -> None:
        """Write the summaries that are due, and a checkpoint if records have waited long enough."""
        now = self.clock()
        with self._lock:
            self._flush(now, everything=False)
            if self.log.unsigned and now - self._last_checkpoint >= self.checkpoint_interval_s:
                self.log.checkpoint()
                self._last_checkpoint = now

    def flush(self) -> None:
        """Write every pending summary now."""
        with self._lock:
            self._flush(self.clock(), everything=True)

    def pending(self) -> int:
        """Refusals counted but not yet written in a summary."""
        with self._lock:
            return sum(w.count for w in self._windows.values())

    def _flush(self, now: float, *, everything: bool) -> None:
        for key, window in list(self._windows.items()):
            if not everything and now - window.started < self.interval_s:
                continue
            del self._windows[key]
            if window.count:
                self.log.append(key[0], **window.sums, reason=key[1], count=window.count, aggregated=True,
                                window_s=round(window.last - window.started, 3))
                self.aggregated += window.count

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except Exception:
                log.exception("cannot write the audit log (summaries, checkpoint)")

    def close(self) -> None:
        """Stop the thread, write pending summaries, then close the log (signing a final checkpoint)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(max(1.0, 2 * self.tick_s))
        try:
            self.flush()
        finally:
            self.log.close()
