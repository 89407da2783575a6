"""Retained device status documents: ``online`` on connect and ``offline`` as the last will. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["STATUS_VERSION", "offline_status", "online_status"]

STATUS_VERSION = 1


def online_status(*, device: str, version: str, ts: float, uptime_s: float, info: Mapping[str, Any]) -> bytes:
    """The retained ``online`` document.

    ``info`` comes from the daemon's status provider; the keys ``profile``, ``providers`` and
    ``models`` (name -> active version) are copied if present.
    """
    doc: dict[str, Any] = {
        "v": STATUS_VERSION,
        "state": "online",
        "device": device,
        "edgert": version,
        "ts": round(ts, 3),
        "uptime_s": round(uptime_s, 1),
        "profile": info.get("profile"),
        "providers": list(info.get("providers") or []),
        "models": {str(k): _version(v) for k, v in dict(info.get("models") or {}).items()},
    }
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def _version(entry: Any) -> str:
    """A model entry is a version string, or the daemon's per-model dict with a "version" key."""
    if isinstance(entry, Mapping):
        return str(entry.get("version", ""))
    return str(entry)


def offline_status(*, device: str, graceful: bool) -> bytes:
    """The retained ``offline`` document (``graceful`` is False in the last will)."""
    doc = {"v": STATUS_VERSION, "state": "offline", "device": device, "graceful": graceful}
    return json.dumps(doc, separators=(",", ":")).encode()
