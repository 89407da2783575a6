"""Crash-safe file writes: temp file, fsync, ``os.replace``, fsync the directory.

A power loss or ``kill -9`` at any point leaves either the old file or the new one, never a mix.
The :class:`FileSystem` seam lets tests inject failures (ENOSPC) and crash points.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

#: Suffix of in-progress files; anything ending in it is garbage after a crash.
TMP_SUFFIX = ".tmp"

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
    """Create ``path`` (and parents) with mode 0700 if missing; return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
