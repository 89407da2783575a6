"""Window assembly for signal streams (pure logic): chunks in, windows of ``window`` samples every ``hop``.

A client pushes chunks of any length along the time axis (say 10 ms of 16 kHz audio: 160 samples);
the assembler keeps the samples not yet consumed and returns each complete window as soon as its
last sample arrives, so a result can be computed every hop before the whole input exists. Every
other axis of a chunk must match the stream's item shape, and its dtype the model input's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgert.errors import InputError

__all__ = ["WindowAssembler", "WindowSpec", "axis_from_layout", "check_chunk"]

#: Letters a layout may use for the time (window) axis, e.g. "CT" or "TC" or "NCW".
TIME_AXES = ("T", "W")


@dataclass(frozen=True)
class WindowSpec:
    """``window`` and ``hop`` in samples along ``axis`` of one item (the model input without batch)."""

    window: int
    hop: int
    axis: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and self.window >= 1):
            raise InputError(f"window must be a positive number of samples, got {self.window!r}")
        if not (isinstance(self.hop, int) and self.hop >= 1):
            raise InputError(f"hop must be a positive number of samples, got {self.hop!r}")


def axis_from_layout(layout: str, rank: int) -> int:
    """The time axis named by ``layout`` (one letter per item axis, 'T' or 'W' for time)."""
    if not isinstance(layout, str) or len(layout) != rank:
        raise InputError(
            f"layout {layout!r} must name each of the {rank} item axes with one letter",
            hint='e.g. layout "CT" for a [channels, time] item; mark the time axis with T',
        )
    found = [i for i, c in enumerate(layout.upper()) if c in TIME_AXES]
    if len(found) != 1:
        raise InputError(f"layout {layout!r} must mark exactly one time axis with 'T' (or 'W')")
    return found[0]


def _shape_text(shape: tuple[Any, ...]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def check_chunk(name: str, chunk: np.ndarray, dtype: np.dtype[Any], shape: tuple[int | None, ...]) -> None:
    """Raise InputError naming expected against got unless ``chunk`` has ``dtype`` and ``shape``.

    ``None`` in ``shape`` matches any length (the time axis of a windowed stream).
    """
    ok = chunk.dtype == dtype and chunk.ndim == len(shape)
    ok = ok and all(want is None or want == got for want, got in zip(shape, chunk.shape, strict=True))
    if not ok:
        raise InputError(
            f"chunk for {name!r}: expected {dtype.name} with shape {_shape_text(shape)}, "
            f"got {chunk.dtype.name} with shape {list(chunk.shape)}",
            hint="every chunk of a stream has the dtype and (except along the time axis) the shape "
            "given when the stream was opened",
        )


def _along(a: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    index = [slice(None)] * a.ndim
    index[axis] = slice(start, stop)
    return a[tuple(index)]


class WindowAssembler:
    """Assemble windows from chunks; see the module docstring. Memory is bounded by window + chunk."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._buf: np.ndarray | None = None
        self._skip = 0  # samples still to discard when hop > window
        self.samples = 0  # samples received so far

    @property
    def buffered(self) -> int:
        """Samples held while waiting for the next window."""
        return 0 if self._buf is None else int(self._buf.shape[self.spec.axis])

    def push(self, chunk: np.ndarray) -> list[np.ndarray]:
        """Take one chunk; return every window it completes (oldest first, each a fresh array)."""
        axis, window, hop = self.spec.axis, self.spec.window, self.spec.hop
        if chunk.ndim <= axis:
            raise InputError(f"chunk of rank {chunk.ndim} has no time axis {axis}")
        self.samples += chunk.shape[axis]
        if self._skip:
            drop = min(self._skip, chunk.shape[axis])
            chunk = _along(chunk, axis, drop, chunk.shape[axis])
            self._skip -= drop
        buf = chunk if self._buf is None else np.concatenate((self._buf, chunk), axis=axis)
        out: list[np.ndarray] = []
        while buf.shape[axis] >= window:
            out.append(np.ascontiguousarray(_along(buf, axis, 0, window)))
            if hop >= buf.shape[axis]:
                self._skip = hop - buf.shape[axis]
                buf = _along(buf, axis, 0, 0)
            else:
                buf = _along(buf, axis, hop, buf.shape[axis])
        # Keep a private copy: the chunk may be a view into a receive buffer that is reused.
        self._buf = np.array(buf, copy=True)
        return out

    def reset(self) -> None:
        """Forget buffered samples (a new segment starts)."""
        self._buf = None
        self._skip = 0
