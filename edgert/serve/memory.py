"""Give freed heap memory back to the OS after a burst: glibc ``malloc_trim(0)``, debounced, off the loop.

Why: after a burst of large requests glibc keeps the freed memory. Its mmap threshold rises to the
size of the largest block freed so far (up to 32 MiB), so later large buffers come from the heap,
and free heap pages below the top are not returned on their own. RSS then stays at its peak for
hours. ``malloc_trim(0)`` hands every free page back (``MADV_DONTNEED``). It walks the arenas and
can take milliseconds on a big heap, so the servers never call it per request: they call
:func:`request_trim` when a connection that held large buffers goes away, and the trim runs once,
:data:`TRIM_DELAY_S` later, in a worker thread (glibc's allocator is thread-safe).

On a libc without ``malloc_trim`` (musl, macOS) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import threading
from collections.abc import Callable

__all__ = [
    "MMAP_THRESHOLD_BYTES", "TRIM_AFTER_BYTES", "TRIM_DELAY_S", "TRIM_THRESHOLD_BYTES",
    "request_trim", "trim_available", "trim_heap", "tune_allocator",
]

log = logging.getLogger("edgert.serve.memory")

#: A request or connection that held at least this many bytes of buffers asks for a trim (debounced).
#: glibc's own mmap threshold: with :func:`tune_allocator` raising it, freed bodies of 128 KiB-1 MiB
#: (the tones demo's ~300 KB JSON) stayed in the heap and never asked; 1 MiB left the demo 1.7 MB
#: higher after load (docs/footprint.md).
TRIM_AFTER_BYTES = 128 << 10
#: Trims are debounced: one runs this long after the first request, however many came meanwhile.
TRIM_DELAY_S = 0.5

#: Allocations up to this size come from the heap, where freed memory is reused, rather than from a
#: fresh mmap that the next request must fault in page by page (glibc's default starts at 128 KiB).
MMAP_THRESHOLD_BYTES = 32 << 20
#: glibc trims the heap top on free() past this much free space. Set high: left at its default, a
#: 1.6 MB JSON request freed its parse buffers back to the OS every time and the next request
#: faulted ~2,000 pages in again (8.5 ms instead of 4.2 ms to decode, BENCHMARKS.md). Memory still
#: comes back after a burst: :func:`request_trim` runs ``malloc_trim(0)``, which ignores this.
TRIM_THRESHOLD_BYTES = 256 << 20
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3

_lock = threading.Lock()
_trim_fn: Callable[[int], int] | None = None
_looked_up = False
_scheduled: set[asyncio.AbstractEventLoop] = set()


def _malloc_trim() -> Callable[[int], int] | None:
    global _trim_fn, _looked_up
    with _lock:
        if not _looked_up:
            _looked_up = True
            try:
                fn = ctypes.CDLL(None).malloc_trim
            except (OSError, AttributeError, TypeError):  # not glibc, or no dynamic symbols
                fn = None
            if fn is not None:
                fn.argtypes = [ctypes.c_size_t]
                fn.restype = ctypes.c_int
            _trim_fn = fn
        return _trim_fn


def tune_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds for a long-running server (see the constants); True if set.

    Process-wide; the daemon calls it once at start. A no-op (False) on a libc without ``mallopt``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )


def trim_available() -> bool:
    """True when this process's libc has ``malloc_trim`` (glibc)."""
    return _malloc_trim() is not None


def trim_heap() -> bool:
    """Return free heap memory to the OS now (blocking; can take milliseconds); True if trimmed."""
    fn = _malloc_trim()
    if fn is None:
        return False
    return bool(fn(0))


def request_trim(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Ask for one :func:`trim_heap` soon, in a worker thread; calls within TRIM_DELAY_S coalesce.

    Call it from the event loop's thread when a large buffer has just been released. Safe and cheap
    to call often, and a no-op where ``malloc_trim`` does not exist.
    """
    if not trim_available():
        return
    loop = loop or asyncio.get_running_loop()
    if loop in _scheduled or loop.is_closed():
        return
    _scheduled.add(loop)
    loop.call_later(TRIM_DELAY_S, _run, loop)


def _run(loop: asyncio.AbstractEventLoop) -> None:
    _scheduled.discard(loop)
    if loop.is_closed():
        return
    try:
        future = loop.run_in_executor(None, trim_heap)
    except RuntimeError:  # the loop is shutting its executor down: nothing left to trim for
        return
    future.add_done_callback(_log_failure)


def _log_failure(future: asyncio.Future[bool]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("malloc_trim failed", exc_info=future.exception())
