"""Append-only, hash-chained audit log with Ed25519-signed checkpoints.

Each line is one canonical-JSON record ``{"i", "ts", "event", "data", "prev", "h"}`` where ``h``
is the sha256 of the record without ``h`` and ``prev`` is the previous record's ``h`` (64 zeros
for the first). Every ``checkpoint_every`` records, and on :meth:`AuditLog.close`, a
``checkpoint`` record carries an Ed25519 signature over its position and ``prev``, so rewriting
history needs the device key, not just a hash function. Files rotate by size
(``audit-000001.jsonl``, ...) and the chain carries across them.

Appends are thread-safe (a lock) and process-safe (``flock``); they flush but do not fsync,
except checkpoints, to stay cheap on the request path. Values that look like secrets are
redacted and raw bytes or tensors are refused, so the log never holds either.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.errors import StoreError
from edgert.security.atomic import ensure_private_dir

__all__ = ["GENESIS", "AuditLog", "VerifyReport", "read_records", "verify_dir", "verify_lines"]

GENESIS = "0" * 64
FILE_PATTERN = re.compile(r"^audit-(\d{6})\.jsonl$")
#: Rotate when the current file reaches this size.
MAX_FILE_BYTES = 4 << 20
#: Sign a checkpoint after this many records.
CHECKPOINT_EVERY = 256
_SIG_LABEL = b"edgert-audit-checkpoint-v1\0"
_SECRET_NAME = re.compile(r"secret|passw|token|private|credential|plaintext", re.IGNORECASE)
REDACTED = "[redacted]"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record: dict[str, Any]) -> str:
    """sha256 of a record's canonical JSON without its ``h`` member."""
    return hashlib.sha256(_canonical({k: v for k, v in record.items() if k != "h"})).hexdigest()


def _checkpoint_message(index: int, prev: str) -> bytes:
    return _SIG_LABEL + str(index).encode("ascii") + b"\0" + prev.encode("ascii")


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


def _files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if FILE_PATTERN.match(p.name))


def _last_line(path: Path) -> tuple[bytes | None, int]:
    """The last complete line of a file and the offset just after it (partial lines are ignored)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        block = 1 << 14
        pos = size
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            end = tail.rfind(b"\n")
            if end >= 0:
                start = tail.rfind(b"\n", 0, end) + 1
                if start > 0 or pos == 0:
                    return tail[start:end], pos + end + 1
        return None, 0


class AuditLog:
    """Append events; call :meth:`close` (or use as a context manager) to sign a final checkpoint."""

    def __init__(self, directory: Path, signer: ed25519.Ed25519PrivateKey | None = None, *,
                 max_bytes: int = MAX_FILE_BYTES, checkpoint_every: int = CHECKPOINT_EVERY,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = ensure_private_dir(Path(directory))
        self.signer = signer
        self.max_bytes = max_bytes
        self.checkpoint_every = checkpoint_every
        self.clock = clock
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

    def _open_latest(self) -> None:
        files = _files(self.directory)
        for path in reversed(files):  # the newest file with a record holds the chain head
            line, end = _last_line(path)
            if path.stat().st_size != end:
                os.truncate(path, end)  # drop a partial line left by a crash mid-write
            if line is not None:
                record = json.loads(line)
                self._head, self._next_index = record["h"], int(record["i"]) + 1
                break
        self._open_file(files[-1] if files else self.directory / "audit-000001.jsonl")
        assert self._path is not None
        self._size = self._path.stat().st_size

    def _sync_with_disk(self) -> None:
        """Pick up records appended or files rotated by another process since our last append."""
        assert self._fd is not None and self._path is not None
        size = os.fstat(self._fd).st_size
        if size != self._size or size >= self.max_bytes:
            latest = _files(self.directory)
            if latest and latest[-1] != self._path:
                self._open_latest()
            elif size != self._size:
                line, _end = _last_line(self._path)
                if line is not None:
                    record = json.loads(line)
                    self._head, self._next_index = record["h"], int(record["i"]) + 1
                self._size = size
        if self._size >= self.max_bytes:
            match = FILE_PATTERN.match(self._path.name)
            assert match is not None
            self._open_file(self.directory / f"audit-{int(match.group(1)) + 1:06d}.jsonl")
            self._size = 0

    # ---- appending ---------------------------------------------------------------------------
    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one event (thread- and process-safe) and return the record written."""
        data = {k: _clean(k, v) for k, v in fields.items()}
        with self._lock:
            record = self._write(event, data)
            if self.signer is not None and self._since_checkpoint >= self.checkpoint_every:
                self._write_checkpoint()
        return record

    def checkpoint(self) -> dict[str, Any] | None:
        """Sign the current head now (no-op without a signing key)."""
        if self.signer is None:
            return None
        with self._lock:
            return self._write_checkpoint()

    def _write_checkpoint(self) -> dict[str, Any]:
        assert self.signer is not None
        record = self._write("checkpoint", None)
        if self._fd is not None:
            os.fsync(self._fd)  # checkpoints are the durable points of the log
        return record

    def _write(self, event: str, data: dict[str, Any] | None) -> dict[str, Any]:
        if self._fd is None:
            raise StoreError("the audit log is closed")
        with self._flocked():
            self._sync_with_disk()
            record: dict[str, Any] = {"i": self._next_index, "ts": _iso(self.clock()), "event": event,
                                      "prev": self._head}
            if data is None:
                assert self.signer is not None
                signature = self.signer.sign(_checkpoint_message(self._next_index, self._head))
                data = {"sig": base64.b64encode(signature).decode("ascii")}
                self._since_checkpoint = -1
            record["data"] = data
            record["h"] = record_hash(record)
            line = _canonical(record) + b"\n"
            try:
                os.write(self._fd, line)
            except OSError as exc:
                raise StoreError(f"cannot append to the audit log: {exc.strerror}",
                                 hint="free disk space in the state directory") from exc
            self._size += len(line)
            self._head, self._next_index = record["h"], self._next_index + 1
            self._since_checkpoint += 1
        return record

    def close(self) -> None:
        """Sign a final checkpoint (if anything is unsigned) and close the files."""
        with self._lock:
            if self._fd is None:
                return
            if self.signer is not None and self._since_checkpoint > 0:
                self._write_checkpoint()
            os.close(self._fd)
            self._fd = None
        os.close(self._lock_fd)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- reading and verifying -------------------------------------------------------------------

def read_lines(directory: Path) -> Iterator[bytes]:
    """Every line of every audit file, oldest first."""
    for path in _files(Path(directory)):
        with open(path, "rb") as f:
            yield from (line.rstrip(b"\n") for line in f)


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    """Every record, oldest first (unverified; use :func:`verify_dir` to check them)."""
    for line in read_lines(directory):
        with contextlib.suppress(ValueError):
            yield json.loads(line)


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of verifying a log: ok, or the first bad record's position and why."""

    ok: bool
    records: int
    checkpoints: int
    unsigned_tail: int
    first_bad: int | None = None
    reason: str | None = None


def verify_lines(lines: Iterable[bytes], public: ed25519.Ed25519PublicKey | None) -> VerifyReport:
    """Check the chain and (with ``public``) every checkpoint signature; stop at the first bad record."""
    prev, count, checkpoints, unsigned = GENESIS, 0, 0, 0

    def bad(reason: str) -> VerifyReport:
        return VerifyReport(False, count, checkpoints, unsigned, count, reason)

    for line in lines:
        try:
            record = json.loads(line)
            ok_shape = isinstance(record, dict) and isinstance(record.get("data"), (dict, type(None)))
        except ValueError:
            ok_shape = False
        if not ok_shape:
            return bad("not a JSON record")
        if record.get("i") != count:
            return bad(f"index {record.get('i')!r} where {count} was expected "
                       "(deleted, inserted or reordered)")
        if record.get("prev") != prev:
            return bad("does not chain to the previous record (deleted, inserted or reordered)")
        if record.get("h") != record_hash(record) or _canonical(record) != line:
            return bad("record content does not match its hash (edited)")
        if record.get("event") == "checkpoint":
            if public is not None:
                try:
                    sig = base64.b64decode(record["data"]["sig"], validate=True)
                    public.verify(sig, _checkpoint_message(count, prev))
                except (InvalidSignature, KeyError, TypeError, ValueError, binascii.Error):
                    return bad("checkpoint signature is invalid (history rewritten)")
            checkpoints += 1
            unsigned = 0
        else:
            unsigned += 1
        prev = record["h"]
        count += 1
    return VerifyReport(True, count, checkpoints, unsigned)


def verify_dir(directory: Path, public: ed25519.Ed25519PublicKey | None) -> VerifyReport:
    """Verify every audit file in ``directory`` as one chain."""
    return verify_lines(read_lines(directory), public)
