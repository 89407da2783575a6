"""Process statistics read straight from the kernel (no psutil at run time)."""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "open_fds", "resident_memory_bytes"]

_STATM = "/proc/self/statm"
_FD_DIR = "/proc/self/fd"


def resident_memory_bytes(statm_path: str = _STATM) -> int | None:
    """Return the resident set size in bytes from ``/proc/self/statm``, or None where it is missing."""
    try:
        with open(statm_path, "rb") as fh:
            fields = fh.read().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds() -> float:
    """Return user + system CPU time of this process in seconds."""
    times = os.times()
    return times.user + times.system


def open_fds(fd_dir: str = _FD_DIR) -> int | None:
    """Return the number of open file descriptors, or None where /proc is missing."""
    try:
        return len(os.listdir(fd_dir))
    except OSError:
        return None
