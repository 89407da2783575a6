"""Crash-safe file writes: temp file, fsync, ``os.replace``, fsync the directory.

A power loss or ``kill -9`` at any point leaves either the old file or the new one, never a mix.
The :class:`FileSystem` seam lets tests inject failures (ENOSPC) and crash points.

Also the explicit modes of private state (0700 directories, 0600 files, whatever the umask) and
the bounded set-aside of damaged files kept for inspection (:func:`set_aside`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("edgert.security.atomic")

#: Suffix of in-progress files; anything ending in it is garbage after a crash.
TMP_SUFFIX = ".tmp"
#: Mode of private state directories and files, applied explicitly (the umask never loosens or breaks it).
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

StepHook = Callable[[str], None]


def _no_step(_step: str) -> None:
    return None


def fsync_dir(path: Path) -> None:
    """fsync a directory so that a rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSystem:
    """The I/O seam of the store: atomic replace of whole files, written from chunks.

    ``on_step`` is called with a step name between every pair of durable operations; tests use
    it to crash the process (SIGKILL) at each step and check that recovery is clean.
    """

    def __init__(self, on_step: StepHook | None = None) -> None:
        self.on_step: StepHook = on_step or _no_step

    def write_chunks(self, fd: int, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        """Write every chunk to ``fd`` in full (the disk-full tests override this)."""
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]

    def write_temp(self, path: Path, chunks: Iterable[bytes | bytearray | memoryview], *,
                   mode: int = 0o600, step: str = "file") -> Path:
        """Write ``chunks`` to ``path``'s temp sibling and fsync it; return the temp path."""
        tmp = path.with_name(path.name + TMP_SUFFIX)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            try:
                self.write_chunks(fd, chunks)
                self.on_step(f"{step}:written")
                os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self.on_step(f"{step}:fsynced")
        return tmp

    def commit(self, tmp: Path, path: Path, *, step: str = "file") -> None:
        """Atomically move a temp file into place and make the rename durable."""
        os.replace(tmp, path)
        self.on_step(f"{step}:replaced")
        fsync_dir(path.parent)
        self.on_step(f"{step}:dir-fsynced")

    def atomic_write(self, path: Path, chunks: Iterable[bytes | bytearray | memoryview], *,
                     mode: int = 0o600, step: str = "file") -> None:
        """Replace ``path`` atomically with the concatenation of ``chunks``."""
        tmp = self.write_temp(path, chunks, mode=mode, step=step)
        try:
            self.commit(tmp, path, step=step)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def remove(self, path: Path, *, step: str = "remove") -> None:
        """Unlink ``path`` (if present) and make the unlink durable."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.on_step(f"{step}:unlinked")
        fsync_dir(path.parent)


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` and any missing parents with mode 0700 (whatever the umask); return it.

    Directories that already exist keep their mode: they may be shared (``/var/lib``) or chosen by
    the operator (systemd's ``StateDirectoryMode=``).
    """
    path = Path(path)
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # created concurrently by someone else: theirs, leave its mode alone
        os.chmod(d, PRIVATE_DIR_MODE)
    if not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    return path


def create_private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if missing, or tighten it to 0600; whatever the umask.

    Call it before a library (SQLite) opens the file, so that it is never readable by others,
    not even for a moment. SQLite gives the ``-wal``, ``-shm`` and journal files the mode of the
    database file.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0),
                 PRIVATE_FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE_MODE:
            os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)


def tighten_files(paths: Iterable[Path]) -> None:
    """Set mode 0600 on those of ``paths`` that exist (for files a library created on its own)."""
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            if stat.S_IMODE(os.stat(p).st_mode) != PRIVATE_FILE_MODE:
                os.chmod(p, PRIVATE_FILE_MODE)


# -- damaged files set aside for inspection, bounded -------------------------------------------------
#: Suffixes of a SQLite database's companion files, moved and pruned together with it.
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def _aside_groups(path: Path, tag: str) -> list[tuple[tuple[int, int], list[Path]]]:
    """Existing set-aside copies of ``path``, newest first: ((time, n), [files])."""
    pattern = re.compile(re.escape(f"{path.name}.{tag}-") + r"(\d+)(?:\.(\d+))?(-wal|-shm|-journal)?$")
    groups: dict[tuple[int, int], list[Path]] = {}
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        m = pattern.match(entry.name)
        if m:
            groups.setdefault((int(m.group(1)), int(m.group(2) or 0)), []).append(entry)
    return sorted(groups.items(), reverse=True)


def _size(files: Iterable[Path]) -> int:
    total = 0
    for f in files:
        with contextlib.suppress(OSError):
            total += os.lstat(f).st_size
    return total


def aside_byte_limit(directory: Path, max_bytes: int, disk_fraction: float) -> int:
    """The byte bound for set-aside copies: ``max_bytes``, at most ``disk_fraction`` of the file system."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return max_bytes
    return min(max_bytes, int(st.f_blocks * st.f_frsize * disk_fraction))


def set_aside(path: Path, *, tag: str = "corrupt", suffixes: Iterable[str] = SQLITE_SUFFIXES,
              max_copies: int, max_bytes: int, now: float | None = None) -> Path | None:
    """Move ``path`` (and its companion files) to ``<name>.<tag>-<unix time>``, then prune old copies.

    At most ``max_copies`` copies totalling at most ``max_bytes`` are kept, newest first; a new copy
    larger than ``max_bytes`` on its own is deleted at once. Returns the copy's path, or None if it
    was not kept. Never raises for a failed unlink (the caller is recovering already).
    """
    stamp = int(time.time() if now is None else now)
    name = f"{path.name}.{tag}-{stamp}"
    n = 0
    while any(os.path.lexists(path.with_name(name + s)) for s in suffixes):
        n += 1
        name = f"{path.name}.{tag}-{stamp}.{n}"
    aside = path.with_name(name)
    for suffix in suffixes:
        src = Path(str(path) + suffix)
        if os.path.lexists(src):
            os.replace(src, Path(str(aside) + suffix))
    kept, total, pruned = 0, 0, 0
    for _key, files in _aside_groups(path, tag):
        size = _size(files)
        if kept < max_copies and total + size <= max_bytes:
            kept += 1
            total += size
            continue
        for f in files:
            with contextlib.suppress(OSError):
                f.unlink()
        pruned += 1
    if pruned:
        log.info("pruned set-aside copies", extra={"file": str(path), "pruned": pruned, "kept": kept,
                                                   "kept_bytes": total, "max_copies": max_copies,
                                                   "max_bytes": max_bytes})
    return aside if os.path.lexists(aside) else None
