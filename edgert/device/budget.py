"""Models under a memory budget: the pure eviction decision and the measurement of a model's footprint.

:func:`plan_room` decides, from values only, which loaded models to unload so that a load of ``need``
bytes fits under the budget: the least recently used models that are neither pinned nor busy go first.
It answers "fits" (with the models to unload, maybe none), "wait" (busy models hold the room; it frees
when their requests finish) or "never" (the model is bigger than the whole budget, or than what the
pinned models leave). The I/O around it (leases, single-flight loads, the Deployer's load path) is in
:mod:`edgert.device.lazy`.

A footprint is measured, not guessed: the resident set size (``/proc/self/statm``) before and after the
model is decrypted, loaded and run once (so the onnxruntime arena it grows while running is counted),
with the C heap trimmed before each reading so that memory freed by an earlier unload does not hide
the new model. It is never below the decrypted model's size, which is the lower bound known without
loading (the package manifest says it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from edgert.metrics.process import resident_memory_bytes

__all__ = [
    "FITS",
    "NEVER",
    "WAIT",
    "Loaded",
    "Room",
    "footprint_of",
    "mb",
    "plan_room",
    "prime_runtime",
    "resident_bytes",
    "trim_heap",
]

log = logging.getLogger("edgert.device.budget")

FITS, WAIT, NEVER = "fits", "wait", "never"
MIB = 1 << 20


@dataclass(frozen=True)
class Loaded:
    """A loaded model as the eviction decision sees it."""

    name: str
    footprint: int  # bytes, measured at load
    pinned: bool  # never unloaded for room
    busy: bool  # requests are admitted to it (or waiting for it), or it is being deployed
    last_used: int  # a logical clock: larger = used more recently


@dataclass(frozen=True)
class Room:
    """The decision for one load: ``verdict`` is FITS (unload ``victims`` first), WAIT or NEVER (``why``)."""

    verdict: str
    victims: tuple[str, ...] = ()
    why: str = ""


def mb(n: float) -> str:
    """Bytes as MiB for messages."""
    return f"{n / MIB:.1f} MB"


def plan_room(loaded: Sequence[Loaded], need: int, budget: int, *, pending: int = 0,
              name: str = "the model") -> Room:
    """Decide how a load of ``need`` bytes fits under ``budget`` beside ``loaded`` (pure).

    ``pending`` counts bytes reserved by other loads in progress. Victims are the least recently used
    idle, unpinned models, as few as needed, oldest first.
    """
    if need > budget:
        return Room(NEVER, why=f"{name} needs at least {mb(need)}, more than the whole memory budget "
                               f"({mb(budget)})")
    pinned = sum(m.footprint for m in loaded if m.pinned)
    if need + pinned > budget:
        return Room(NEVER, why=f"{name} needs at least {mb(need)} but the pinned models hold {mb(pinned)} "
                               f"of the {mb(budget)} memory budget")
    used = sum(m.footprint for m in loaded) + pending
    over = used + need - budget
    if over <= 0:
        return Room(FITS)
    victims: list[str] = []
    for m in sorted((m for m in loaded if not m.pinned and not m.busy), key=lambda m: m.last_used):
        if over <= 0:
            break
        victims.append(m.name)
        over -= m.footprint
    if over > 0:
        return Room(WAIT, why=f"{name} needs {mb(need)}; {mb(used)} of the {mb(budget)} memory budget is "
                              "held by pinned or busy models")
    return Room(FITS, tuple(victims))


def footprint_of(before: int | None, after: int | None, lower_bound: int) -> int:
    """A load's footprint: the resident-set growth, never below ``lower_bound`` (the model's size)."""
    if before is None or after is None:  # no /proc: the decrypted size is all that is known
        return lower_bound
    return max(after - before, lower_bound)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (payloads here are under 128 bytes)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def _identity_onnx() -> bytes:
    """The smallest ONNX model (y = Identity(x), float[1], opset 13), encoded by hand (no onnx package)."""
    value_type = _field(2, _field(1, b"\x08\x01" + _field(2, _field(1, b"\x08\x01"))))
    node = _field(1, b"x") + _field(2, b"y") + _field(4, b"Identity")
    graph = _field(1, node) + _field(2, b"prime") + _field(11, _field(1, b"x") + value_type) \
        + _field(12, _field(1, b"y") + value_type)
    return b"\x08\x08" + _field(8, b"\x10\x0d") + _field(7, graph)


def prime_runtime(runtime: object) -> None:
    """Load and close a one-node ONNX model, so the inference runtime's one-off start-up memory (about
    30 MB for onnxruntime: its libraries and environment) is not counted in the first model's footprint."""
    model = runtime.load(_identity_onnx(), name="edgert-prime", version="0")  # type: ignore[attr-defined]
    model.close()


_malloc_trim: object = None


def trim_heap() -> None:
    """Give freed C heap back to the kernel (glibc ``malloc_trim``), so unloads really lower the RSS."""
    global _malloc_trim
    if _malloc_trim is None:
        path = ctypes.util.find_library("c")
        try:
            _malloc_trim = getattr(ctypes.CDLL(path), "malloc_trim", False) if path else False
        except OSError:
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)  # type: ignore[operator]


def resident_bytes() -> int | None:
    """The process's resident set size after trimming the heap (None where /proc is missing)."""
    trim_heap()
    return resident_memory_bytes()
