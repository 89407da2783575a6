"""W3C Trace Context (``traceparent``): parse what a caller sends, make new ids, format the reply.

Pure: strings in, values out. A malformed header is never an error for the request: the caller
ignores it and starts a new trace (W3C Trace Context §4.3: "restart the trace"). Ids are random but
not secret, so the fast ``random`` generator is enough.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = [
    "TRACEPARENT_VERSION",
    "TraceContext",
    "new_ids",
    "new_span_id",
    "new_trace_id",
    "parse_traceparent",
]

#: The version this module writes; higher versions are read as the spec says (prefix only).
TRACEPARENT_VERSION = "00"
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: Longest header we look at (a future version may append fields; version 00 is exactly 55).
MAX_TRACEPARENT_CHARS = 512


@dataclass(frozen=True)
class TraceContext:
    """A trace id (32 hex), the caller's span id (16 hex, "" when we started the trace) and flags."""

    trace_id: str
    parent_id: str = ""
    flags: str = "00"

    def traceparent(self, span_id: str) -> str:
        """The ``traceparent`` value naming ``span_id`` (our span) as the parent of what follows."""
        return f"{TRACEPARENT_VERSION}-{self.trace_id}-{span_id}-{self.flags}"


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and _HEX.issuperset(text)


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The context in a ``traceparent`` header value, or None when it is absent or malformed.

    Rules (W3C Trace Context, Level 1 §3.2): ``version-traceid-parentid-flags``, lower-case hex;
    version ``ff`` is invalid; version ``00`` has exactly these four fields; a higher version may
    append ``-...`` fields, which are ignored; all-zero trace or parent ids are invalid.
    """
    if not value or len(value) > MAX_TRACEPARENT_CHARS:
        return None
    value = value.strip()
    parts = value.split("-")
    if len(parts) < 4:
        return None
    version, trace_id, parent_id, flags = parts[0], parts[1], parts[2], parts[3]
    if not _is_hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not _is_hex(trace_id, 32) or trace_id == _ZERO_TRACE:
        return None
    if not _is_hex(parent_id, 16) or parent_id == _ZERO_SPAN:
        return None
    if not _is_hex(flags, 2):
        return None
    # Of the flags, only "sampled" (bit 0) is defined; we pass on only what we understand.
    return TraceContext(trace_id, parent_id, "01" if int(flags, 16) & 1 else "00")


def new_ids() -> tuple[str, str]:
    """A new random trace id and span id at once (one random draw: this is on every request's path)."""
    text = f"{random.getrandbits(192):048x}"
    trace_id, span_id = text[:32], text[32:]
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:  # 2**-64 odds; the spec forbids zero ids
        return new_trace_id(), new_span_id()
    return trace_id, span_id


def new_trace_id() -> str:
    """A random, non-zero 32-hex-digit trace id."""
    while True:
        value = random.getrandbits(128)
        if value:
            return f"{value:032x}"


def new_span_id() -> str:
    """A random, non-zero 16-hex-digit span id."""
    while True:
        value = random.getrandbits(64)
        if value:
            return f"{value:016x}"
