"""The model store's ``state.json``: read with a parse cache, written atomically, and its entry helpers.

:class:`ModelStore <edgert.security.store.ModelStore>` owns what the state means (active/previous,
the anti-rollback floor, installs and removals) and holds its lock around every change. This module
only reads and writes the document: :class:`StateFile` parses it once per version of the file
(state.json is only ever replaced, so inode, mtime and size identify a parse) and replaces it
atomically through :class:`~edgert.security.atomic.FileSystem`; the functions below are the pure
edits the store makes to a parsed state.
"""

from __future__ import annotations

import copy
import errno
import json
import os
from pathlib import Path
from typing import Any

from edgert.errors import StoreError
from edgert.security import package as pkg
from edgert.security.atomic import FileSystem

__all__ = ["StateFile", "disk_error", "empty_state", "entry_doc", "forget_versions", "normalise_entry",
           "raise_floor"]


def empty_state() -> dict[str, Any]:
    """The state of a store with nothing installed."""
    return {"store_version": 1, "models": {}, "highest": {}}


def disk_error(exc: OSError, what: str) -> StoreError:
    """The StoreError for a failed write while ``what`` (a full disk gets its own message and hint)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"no space left on the device while {what}; nothing was changed",
                          hint="free disk space (e.g. 'edgert models remove' old versions) and retry")
    return StoreError(f"cannot write the model store while {what}: {exc.strerror}; nothing was changed",
                      hint="check the state directory's permissions and free space")


class StateFile:
    """``state.json`` at ``path``: parsed once per version of the file, replaced atomically."""

    def __init__(self, path: str, fs: FileSystem) -> None:
        self.path = path
        self.fs = fs
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None

    def load(self) -> dict[str, Any]:
        """The parsed state, as a private copy the caller may change and save."""
        return copy.deepcopy(self.peek())

    def peek(self) -> dict[str, Any]:
        """The parsed state, shared with the cache: read it, never change it."""
        path = self.path
        try:
            # state.json is only ever replaced (new inode), so (inode, mtime, size) identifies a parse.
            st = os.stat(path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._cache is not None and self._cache[0] == stamp:
                return self._cache[1]
            with open(path, "rb") as f:
                state = json.loads(f.read())
        except FileNotFoundError:
            return empty_state()
        except (OSError, ValueError) as exc:
            raise StoreError(f"model store state {path} is unreadable or corrupt",
                             hint="restore it from backup, or remove it and re-install the models") from exc
        if not isinstance(state, dict) or not isinstance(state.get("models"), dict):
            raise StoreError(f"model store state {path} has an unexpected shape",
                             hint="restore it from backup, or remove it and re-install the models")
        state.setdefault("highest", {})
        self._cache = (stamp, state)
        return state

    def save(self, state: dict[str, Any], what: str) -> None:
        """Replace the file with ``state`` (atomically); StoreError naming ``what`` if the write fails."""
        data = json.dumps(state, sort_keys=True, indent=1).encode("utf-8")
        try:
            self.fs.atomic_write(Path(self.path), [data], step="state")
        except OSError as exc:
            raise disk_error(exc, what) from exc


def raise_floor(state: dict[str, Any], name: str, version: str) -> None:
    """Raise ``name``'s anti-rollback floor to ``version`` if it is higher.

    The floor is the highest version ever *activated* (served), not merely installed: a pending
    update that never served (e.g. one that failed its health check) must not lock out the
    versions below it.
    """
    highest = state["highest"].get(name)
    if highest is None or pkg.compare_versions(version, highest) > 0:
        state["highest"][name] = version


def normalise_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """Fill in members that state files written by older edgert lack."""
    entry.setdefault("active", None)
    entry.setdefault("previous", None)
    entry.setdefault("installed", [])
    entry.setdefault("failed", {})
    entry.setdefault("variants", {})
    return entry


def entry_doc(state: dict[str, Any], name: str, *, create: bool = False) -> dict[str, Any]:
    """A model's state entry (created if ``create``), or StoreError if it is not installed."""
    entry = state["models"].get(name)
    if entry is None:
        if not create:
            raise StoreError(f"model {name!r} is not installed", hint="'edgert models list' shows what is")
        entry = state["models"][name] = {}
    return normalise_entry(entry)


def forget_versions(entry: dict[str, Any], versions: list[str]) -> None:
    """Drop ``versions`` from an entry's installed list and per-version records."""
    entry["installed"] = [v for v in entry["installed"] if v not in versions]
    for v in versions:
        entry["variants"].pop(v, None)
        entry["failed"].pop(v, None)
