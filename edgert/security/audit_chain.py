"""The audit log's format and its verification: record hashes, signatures, the head file, ``verify``.

Pure functions over lines and dicts (plus two small readers); :mod:`edgert.security.audit` writes
the log with them. What ``verify`` checks:

- every record chains to the one before it and matches its hash; every checkpoint's Ed25519
  signature is valid;
- the oldest record present is record 0, or a *signed* ``audit_pruned`` record later in the log
  says that retention deleted exactly the records before it (so deleting old files by hand shows);
- the log reaches the signed **head** kept in ``head.json`` (and, if given, the fleet's copy of a
  head): a log cut back to an earlier point, emptied or deleted is reported;
- a log whose checkpoints say a head file was kept has one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

__all__ = ["GAP_EVENT", "GENESIS", "HEAD_FILE", "HEAD_MISSING_EVENT", "PRUNED_EVENT", "VerifyReport",
           "make_head", "read_head", "read_lines", "read_records", "record_hash", "verify_dir", "verify_head",
           "verify_lines"]

GENESIS = "0" * 64
FILE_PATTERN = re.compile(r"^audit-(\d{6})\.jsonl$")
#: The signed head (last checkpoint's index and hash), kept beside the log files.
HEAD_FILE = "head.json"
HEAD_VERSION = 1
#: Event that retention appends (and signs) before deleting an old file.
PRUNED_EVENT = "audit_pruned"
#: Event a writer appends (and signs) when the log on disk is behind the head it knew: records were lost.
GAP_EVENT = "audit_gap"
#: Event a writer appends when it opens a non-empty log without a head file.
HEAD_MISSING_EVENT = "audit_head_missing"
#: Checkpoint field saying that a head file is kept for this log (so a deleted head file shows).
ANCHORED = "anchored"
#: Largest head file read (it is about 250 bytes).
MAX_HEAD_BYTES = 4096
_SIG_LABEL = b"edgert-audit-checkpoint-v1\0"
_HEAD_LABEL = b"edgert-audit-head-v1\0"


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no whitespace, UTF-8) of ``obj``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """sha256 of a record's canonical JSON without its ``h`` member."""
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "h"})).hexdigest()


def checkpoint_message(index: int, prev: str) -> bytes:
    """What a checkpoint at ``index`` signs."""
    return _SIG_LABEL + str(index).encode("ascii") + b"\0" + prev.encode("ascii")


def _head_message(seq: int, digest: str) -> bytes:
    return _HEAD_LABEL + str(seq).encode("ascii") + b"\0" + digest.encode("ascii")


def make_head(record: Mapping[str, Any], signer: ed25519.Ed25519PrivateKey) -> dict[str, Any]:
    """The signed head for ``record`` (normally the newest checkpoint): {v, seq, hash, ts, sig}."""
    sig = signer.sign(_head_message(int(record["i"]), str(record["h"])))
    return {"v": HEAD_VERSION, "seq": int(record["i"]), "hash": record["h"], "ts": record["ts"],
            "sig": base64.b64encode(sig).decode("ascii")}


def verify_head(head: Any, public: ed25519.Ed25519PublicKey | None) -> str | None:
    """Why ``head`` is not a valid signed head (None when it is; the signature only with ``public``)."""
    if not (isinstance(head, dict) and head.get("v") == HEAD_VERSION and isinstance(head.get("seq"), int)
            and head["seq"] >= 0 and isinstance(head.get("hash"), str) and isinstance(head.get("sig"), str)):
        return "is not a head record ({v: 1, seq, hash, sig})"
    if public is not None:
        try:
            sig = base64.b64decode(head["sig"], validate=True)
            public.verify(sig, _head_message(head["seq"], head["hash"]))
        except (InvalidSignature, ValueError, binascii.Error):
            return "has an invalid signature (forged, or from another device)"
    return None


def list_files(directory: Path) -> list[Path]:
    """The audit files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if FILE_PATTERN.match(p.name))


def first_line(path: Path) -> bytes | None:
    """The first complete line of a file, or None."""
    with open(path, "rb") as f:
        line = f.readline()
    return line[:-1] if line.endswith(b"\n") else None


def last_line(path: Path) -> tuple[bytes | None, int]:
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


def read_head(directory: Path) -> dict[str, Any] | None:
    """The head file's record, or None if there is none; ValueError if it is not JSON."""
    path = Path(directory) / HEAD_FILE
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_HEAD_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_HEAD_BYTES:
        raise ValueError(f"{path} is larger than {MAX_HEAD_BYTES} bytes")
    head = json.loads(raw)
    if not isinstance(head, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return head


def read_lines(directory: Path) -> Iterator[bytes]:
    """Every line of every audit file, oldest first."""
    for path in list_files(Path(directory)):
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
    #: Index of the oldest record present (above 0 when retention pruned older files).
    first_index: int = 0
    #: Index of the newest record present (None for an empty log).
    last_index: int | None = None
    #: Index the signed head file points at (None without a head file).
    head_seq: int | None = None


class _Walk:
    """State of one pass over the lines of a log."""

    def __init__(self, public: ed25519.Ed25519PublicKey | None) -> None:
        self.public = public
        self.prev, self.index, self.start, self.start_prev = GENESIS, 0, 0, GENESIS
        self.count = self.checkpoints = self.unsigned = 0
        self.last_checkpoint = -1
        self.anchored = False
        self.hashes: dict[int, str] = {}  # index -> h, only for the indexes a head points at
        self.claims: list[tuple[int, int, str]] = []  # (record index, last pruned index, its h)
        self.incidents: list[tuple[int, str]] = []  # (first lost index, why) as writers recorded them

    def feed(self, line: bytes) -> str | None:
        """Check one line; return why it is bad, or None."""
        try:
            record = json.loads(line)
            ok_shape = isinstance(record, dict) and isinstance(record.get("data"), (dict, type(None)))
        except ValueError:
            ok_shape = False
        if not ok_shape:
            return "not a JSON record"
        if self.count == 0 and isinstance(record.get("i"), int) and record["i"] > 0 \
                and isinstance(record.get("prev"), str):
            # The oldest file present starts later: fine if a signed audit_pruned record says so (finish).
            self.index = self.start = record["i"]
            self.prev = self.start_prev = record["prev"]
        if record.get("i") != self.index:
            return (f"index {record.get('i')!r} where {self.index} was expected "
                    "(deleted, inserted or reordered)")
        if record.get("prev") != self.prev:
            return "does not chain to the previous record (deleted, inserted or reordered)"
        if record.get("h") != record_hash(record) or canonical(record) != line:
            return "record content does not match its hash (edited)"
        data = record.get("data") or {}
        if record.get("event") == "checkpoint":
            if self.public is not None:
                try:
                    sig = base64.b64decode(data["sig"], validate=True)
                    self.public.verify(sig, checkpoint_message(self.index, self.prev))
                except (InvalidSignature, KeyError, TypeError, ValueError, binascii.Error):
                    return "checkpoint signature is invalid (history rewritten)"
            self.checkpoints += 1
            self.unsigned = 0
            self.last_checkpoint = self.index
            self.anchored = self.anchored or data.get(ANCHORED) is True
        else:
            self.unsigned += 1
            self._note(str(record.get("event")), data)
        self.hashes[self.index] = record["h"]
        self.prev = record["h"]
        self.index += 1
        self.count += 1
        return None

    def _note(self, event: str, data: Mapping[str, Any]) -> None:
        """Remember retention's claims and the losses that writers recorded in the log."""
        if event == PRUNED_EVENT and isinstance(data.get("last"), int):
            self.claims.append((self.index, data["last"], str(data.get("last_h"))))
        elif event == GAP_EVENT:
            expected, found = data.get("expected_seq"), data.get("found_last")
            lost_from = max(0, found + 1) if isinstance(found, int) else self.index
            ending = f"ending at record {found}" if lost_from > 0 else "empty or missing"
            self.incidents.append((lost_from, (
                f"truncated before record {expected}: a writer found the log {ending} (per the "
                f"{data.get('source', 'head')}); records {lost_from}..{expected} are gone "
                f"(noted at record {self.index})")))
        elif event == HEAD_MISSING_EVENT and self.anchored:
            self.incidents.append((self.index, (
                f"the head file was deleted: a writer found it missing at record {self.index}, after "
                "checkpoints that say it was kept (records after the last checkpoint may be gone)")))

    def report(self, ok: bool, first_bad: int | None = None, reason: str | None = None,
               head_seq: int | None = None) -> VerifyReport:
        """The report for the lines seen so far."""
        last = self.index - 1 if self.count else None
        return VerifyReport(ok, self.count, self.checkpoints, self.unsigned, first_bad, reason,
                            self.start, last, head_seq)

    def pruned_prefix_problem(self) -> str | None:
        """Why the log's start is not record 0 or a pruned prefix the log signed for (None if it is)."""
        if self.start == 0:
            return None
        for index, last, last_h in self.claims:
            signed = self.public is None or index < self.last_checkpoint
            if signed and last == self.start - 1 and last_h == self.start_prev:
                return None
        return (f"the log starts at record {self.start}, but no signed {PRUNED_EVENT} record says that "
                f"records 0..{self.start - 1} were pruned (older files were deleted)")

    def head_problem(self, head: Mapping[str, Any], what: str) -> tuple[int, str] | None:
        """(first bad index, why) if the log does not reach ``head`` or differs from it."""
        seq, last = head["seq"], self.index - 1
        if self.count == 0:
            return 0, (f"the audit log is empty or missing, but {what} says it held records up to {seq} "
                       "(the log was deleted or emptied)")
        if seq > last:
            return last + 1, (f"the log ends at record {last}, but {what} says it held records up to {seq}: "
                              f"truncated (at least {seq - last} records are gone)")
        if seq >= self.start and seq in self.hashes and self.hashes[seq] != head["hash"]:
            return seq, f"record {seq} differs from {what} (the log was rewritten)"
        return None


def verify_lines(lines: Iterable[bytes], public: ed25519.Ed25519PublicKey | None, *,
                 head: Mapping[str, Any] | None = None,
                 fleet_head: Mapping[str, Any] | None = None) -> VerifyReport:
    """Check the chain, checkpoints, pruned prefix and (if given) the log's and the fleet's heads."""
    named = ((head, "its signed head"), (fleet_head, "the fleet's copy of its head"))
    heads = [(h, what) for h, what in named if h is not None]
    walk = _Walk(public)
    for h, what in heads:
        problem = verify_head(h, public)
        if problem:
            return walk.report(False, None, f"{what} {problem}")
    wanted = {int(h["seq"]) for h, _ in heads}
    for line in lines:
        problem = walk.feed(line)
        if problem:
            return walk.report(False, walk.index, problem)
        if walk.index - 1 not in wanted:
            walk.hashes.pop(walk.index - 1, None)  # keep memory flat on long logs
    head_seq = int(head["seq"]) if head is not None else None
    for h, what in heads:
        found = walk.head_problem(h, what)
        if found:
            return walk.report(False, found[0], found[1], head_seq)
    if walk.count == 0:
        return walk.report(False, 0, "no audit records and no head file: the audit log is empty or missing "
                                     "(a device with keys always has a keys_created record)")
    problem = walk.pruned_prefix_problem()
    if problem:
        return walk.report(False, walk.start, problem, head_seq)
    if walk.incidents:
        return walk.report(False, walk.incidents[0][0], walk.incidents[0][1], head_seq)
    if head is None and walk.anchored:
        return walk.report(False, walk.index, "the head file is missing, but the log's checkpoints say one "
                                              "was kept (deleted; the log may also have been cut back)")
    return walk.report(True, head_seq=head_seq)


def verify_dir(directory: Path, public: ed25519.Ed25519PublicKey | None, *,
               fleet_head: Mapping[str, Any] | None = None) -> VerifyReport:
    """Verify every audit file in ``directory`` as one chain, against its head file (and the fleet's)."""
    try:
        head = read_head(Path(directory))
    except (OSError, ValueError) as exc:
        return VerifyReport(False, 0, 0, 0, None, f"the head file cannot be read: {exc}")
    return verify_lines(read_lines(directory), public, head=head, fleet_head=fleet_head)
