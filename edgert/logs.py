"""JSON-lines logging on stderr (journald-friendly). Never log secrets or tensor contents."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line; extra= fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


#: The level asked for on the command line (``-v``), if any: config files may make logs more verbose
#: than it, never quieter.
_explicit_level: int | None = None


def configure_logging(level: int = logging.INFO, stream: Any = None, *, explicit: bool = False) -> None:
    """Send the ``edgert`` logger tree to stderr as JSON lines at ``level``.

    ``explicit``: the user asked for this level on the command line (see :func:`explicit_level`).
    """
    global _explicit_level
    if explicit:
        _explicit_level = level
    logger = logging.getLogger("edgert")
    for handler in list(logger.handlers):
        if getattr(handler, "_edgert", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._edgert = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def explicit_level() -> int | None:
    """The level given on the command line with ``-v``, or None when it was not given."""
    return _explicit_level


def monotonic_ms() -> float:
    """Milliseconds from the monotonic clock (for durations, never for timestamps)."""
    return time.monotonic() * 1000.0
