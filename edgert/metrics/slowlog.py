"""Reading slow-request log lines back (for ``edgert trace tail``): pure parsing and formatting.

The daemon writes each slow request as one JSON line (``"msg": "slow request"``, see
:class:`edgert.metrics.timing.Tracer`). Lines may come straight from stderr, from
``journalctl -o cat`` or from a journald/syslog line with a prefix ("... edgert[812]: {...}"), so the
JSON object is looked for from the first ``{``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from edgert.metrics.timing import SLOW_REQUEST_MSG

__all__ = ["SlowFilter", "format_slow", "parse_slow_line"]

#: Stages printed after the total, in request order, with their short label.
_STAGES = (
    ("admission_ms", "admission"),
    ("input_ms", "input"),
    ("queue_ms", "queue"),
    ("load_ms", "load"),
    ("infer_ms", "infer"),
    ("output_ms", "output"),
    ("encode_ms", "encode"),
)


def parse_slow_line(line: str) -> dict[str, Any] | None:
    """The slow-request record in ``line``, or None for any other line (never raises)."""
    start = line.find("{")
    if start < 0 or SLOW_REQUEST_MSG not in line:
        return None
    try:
        doc = json.loads(line[start:])
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("msg") != SLOW_REQUEST_MSG:
        return None
    return doc


class SlowFilter:
    """Which slow-request records to show: by model, trace id and a minimum total time."""

    def __init__(self, model: str = "", trace_id: str = "", min_ms: float = 0.0) -> None:
        self.model, self.trace_id, self.min_ms = model, trace_id.lower(), min_ms

    def __call__(self, doc: Mapping[str, Any]) -> bool:
        """True when ``doc`` passes every filter given."""
        if self.model and doc.get("model") != self.model:
            return False
        if self.trace_id and doc.get("trace_id") != self.trace_id:
            return False
        total = doc.get("total_ms")
        return not (self.min_ms and isinstance(total, (int, float)) and total < self.min_ms)


def _ms(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def format_slow(doc: Mapping[str, Any]) -> str:
    """One human-readable line: time, trace id, model@version, status, total and each stage in ms."""
    ts = doc.get("ts")
    when = (
        time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int((ts % 1) * 1000):03d}"
        if isinstance(ts, (int, float))
        else "--:--:--.---"
    )
    model = f"{doc.get('model', '?')}@{doc.get('version') or '?'}"
    stages = " ".join(f"{label} {_ms(doc.get(key))}" for key, label in _STAGES)
    batch = doc.get("batch_size")
    batch_text = "-" if batch is None else str(batch)
    cached = " cached" if doc.get("cached") else ""
    return (
        f"{when} {doc.get('trace_id', '-')} {model} {doc.get('transport', '-')} {doc.get('status', '-')} "
        f"total {_ms(doc.get('total_ms'))} ms | {stages} | batch {batch_text}{cached}"
    )
