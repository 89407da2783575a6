"""Build and parse edgert's MQTT topics (DESIGN.md §4). Pure: no I/O.

Layout::

    edgert/v1/{fleet}/devices/{device}/{status|telemetry|events|cmd|reply}
    edgert/v1/{fleet}/groups/{group}/deployment
    edgert/v1/{fleet}/repo/{path...}

Ids are restricted to ``[A-Za-z0-9._-]``, 1..64 characters, not ``.`` or ``..``, so an id can
never carry a wildcard (``+``, ``#``), a level separator (``/``), a ``$`` system prefix or a NUL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgert.errors import SyncError

__all__ = [
    "DEVICE_CHANNELS",
    "PREFIX",
    "ParsedTopic",
    "check_id",
    "deployment_topic",
    "device_subtree",
    "device_topic",
    "parse_topic",
    "repo_topic",
]

PREFIX = "edgert/v1"
DEVICE_CHANNELS = ("status", "telemetry", "events", "cmd", "reply")
MAX_ID_LEN = 64
MAX_REPO_PATH_LEVELS = 8
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a safe topic level, else raise SyncError naming the problem."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value) or value in (".", ".."):
        shown = repr(value)[:80]
        raise SyncError(
            f"invalid {what} {shown}: must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ - "
            "(no '/', '+', '#', '$', spaces, '.' or '..')",
            hint=f"choose a {what} made of letters, digits, dots, dashes and underscores",
        )
    return value


def device_subtree(fleet: str, device: str) -> str:
    """The prefix a device may publish under, e.g. ``edgert/v1/f1/devices/d1/``."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/devices/{check_id(device, 'device id')}/"


def device_topic(fleet: str, device: str, channel: str) -> str:
    """Topic of one device channel (status, telemetry, events, cmd, reply)."""
    if channel not in DEVICE_CHANNELS:
        raise SyncError(f"unknown device channel {channel!r}; expected one of {', '.join(DEVICE_CHANNELS)}")
    return device_subtree(fleet, device) + channel


def deployment_topic(fleet: str, group: str) -> str:
    """Retained desired-state topic of a device group."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/groups/{check_id(group, 'group id')}/deployment"


def repo_topic(fleet: str, *path: str) -> str:
    """Topic under the fleet's repository request/response tree; each path level is checked."""
    if not path or len(path) > MAX_REPO_PATH_LEVELS:
        raise SyncError(f"repo topic needs 1..{MAX_REPO_PATH_LEVELS} path levels, got {len(path)}")
    levels = [check_id(p, "repo path level") for p in path]
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/repo/" + "/".join(levels)


@dataclass(frozen=True)
class ParsedTopic:
    """A parsed edgert topic: kind is 'device', 'deployment' or 'repo'."""

    kind: str
    fleet: str
    device: str | None = None
    channel: str | None = None
    group: str | None = None
    path: tuple[str, ...] = ()


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a concrete edgert topic; raise SyncError for anything else (wildcards included)."""
    parts = topic.split("/")
    if len(parts) < 4 or "/".join(parts[:2]) != PREFIX:
        raise SyncError(f"not an edgert v1 topic: {topic[:120]!r}")
    fleet = check_id(parts[2], "fleet id")
    kind, rest = parts[3], parts[4:]
    if kind == "devices" and len(rest) == 2 and rest[1] in DEVICE_CHANNELS:
        return ParsedTopic("device", fleet, device=check_id(rest[0], "device id"), channel=rest[1])
    if kind == "groups" and len(rest) == 2 and rest[1] == "deployment":
        return ParsedTopic("deployment", fleet, group=check_id(rest[0], "group id"))
    if kind == "repo" and 1 <= len(rest) <= MAX_REPO_PATH_LEVELS:
        return ParsedTopic("repo", fleet, path=tuple(check_id(p, "repo path level") for p in rest))
    raise SyncError(f"unknown edgert topic layout: {topic[:120]!r}")
