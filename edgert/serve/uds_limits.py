"""Limits of the Unix-socket server, and the frame cap sized to the served models (pure logic).

The socket server holds at most one frame being received, ``max_pipelined`` received frames and
about ``write_high_water`` bytes of unsent replies per connection, for at most ``max_connections``
connections. A frame larger than the cap is refused from its 12-byte header, before any of its
body is buffered.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

from edgert.serve.port import ModelMeta

__all__ = [
    "AUTO_BATCH_ROWS",
    "AUTO_FRAME_MAX",
    "AUTO_FRAME_MIN",
    "BUDGET_MIN_FRAME",
    "META_ALLOWANCE",
    "FrameBudget",
    "UdsLimits",
    "frame_cap_for",
]

#: A dynamic batch dimension is sized for this many rows: the largest ``max_batch`` of the shipped
#: device profiles (jetson-orin), so no request the engine would accept is refused by the socket.
AUTO_BATCH_ROWS = 64
#: The automatic cap never goes below this: small models still take any request the engine
#: answers itself (e.g. "batch size 4000 exceeds the maximum"), rather than a framing error.
AUTO_FRAME_MIN = 4 * 1024 * 1024
#: ... nor above this (the HTTP side's default body limit); also used when an input has dynamic
#: dimensions other than the batch, whose size cannot be known in advance.
AUTO_FRAME_MAX = 64 * 1024 * 1024
#: Room for the JSON meta document and alignment padding on top of the tensor bytes.
META_ALLOWANCE = 64 * 1024
#: Frames smaller than this skip the server-wide budget (per connection they are bounded anyway).
BUDGET_MIN_FRAME = 64 * 1024


@dataclass(frozen=True)
class UdsLimits:
    """Per-server limits of the Unix socket (the socket's counterpart of HttpLimits).

    ``max_frame_bytes`` None sizes the cap from the served models (:func:`frame_cap_for`), and
    re-sizes it when a larger frame arrives after a model was loaded; a number fixes it.
    """

    #: Largest frame body accepted; None = automatic (see frame_cap_for).
    max_frame_bytes: int | None = None
    #: A frame must arrive completely within this many seconds of its first byte.
    read_timeout_s: float = 30.0
    #: A connection with nothing in flight is closed after this many seconds.
    idle_timeout_s: float = 75.0
    #: A connection whose client reads none of its replies for this long is dropped.
    write_timeout_s: float = 30.0
    #: Connections beyond this are answered with a 503 ERROR frame and closed.
    max_connections: int = 256
    #: Received frames queued per connection before the server stops reading from it.
    max_pipelined: int = 16
    #: Unsent reply bytes per connection above which the server stops reading from it.
    write_high_water: int = 256 * 1024
    #: A client leaving more than this of earlier replies unread is disconnected.
    max_output_bytes: int = 16 * 1024 * 1024
    #: Server-wide bytes of large frames being received or answered at once (never below the frame
    #: cap). A large frame's body is read only once its size is reserved here; others wait in turn.
    max_buffered_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_frame_bytes is not None and self.max_frame_bytes < 1:
            raise ValueError(f"max_frame_bytes must be positive or None, got {self.max_frame_bytes}")
        for name in ("read_timeout_s", "idle_timeout_s", "write_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "max_connections",
            "max_pipelined",
            "write_high_water",
            "max_output_bytes",
            "max_buffered_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _input_bytes(meta: ModelMeta) -> int:
    """Bytes of one request carrying every input of ``meta`` at the assumed batch size."""
    total = 0
    for tensor in meta.inputs:
        count = 1
        for i, dim in enumerate(tensor.shape):
            if isinstance(dim, int) and dim >= 0:
                count *= dim
            elif i == 0:
                count *= AUTO_BATCH_ROWS
            else:  # a dynamic spatial or sequence dimension: no size can be known
                return AUTO_FRAME_MAX
        total += count * tensor.dtype.itemsize + 8  # + alignment padding
    return total


def frame_cap_for(metas: Iterable[ModelMeta]) -> int:
    """The automatic frame cap: the largest served request plus meta room, within the MIN/MAX bounds."""
    largest = max((_input_bytes(m) for m in metas), default=0)
    return int(min(AUTO_FRAME_MAX, max(AUTO_FRAME_MIN, math.ceil(largest) + META_ALLOWANCE)))


class FrameBudget:
    """Server-wide bytes for large frames: reserve before reading a body, release once answered.

    A reservation that does not fit waits in FIFO order (so a big frame is not starved by small
    ones). Whoever holds a reservation only needs its own bytes to finish, so waiting can never
    deadlock; a holder that stalls is closed by its read timeout, which releases its share.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self.waiting: deque[tuple[Hashable, int]] = deque()

    def reserve(self, owner: Hashable, size: int) -> bool:
        """Take ``size`` bytes now (True), or queue ``owner`` for them (False: wait for release())."""
        if not self.waiting and self.used + size <= self.total:
            self.used += size
            return True
        self.waiting.append((owner, size))
        return False

    def release(self, size: int) -> list[Hashable]:
        """Give ``size`` bytes back; returns the waiting owners whose reservations now hold, in order."""
        self.used = max(0, self.used - size)
        return self._grant()

    def cancel(self, owner: Hashable) -> list[Hashable]:
        """Forget ``owner``'s queued request (it went away); returns owners granted as a result."""
        self.waiting = deque(w for w in self.waiting if w[0] is not owner)
        return self._grant()

    def _grant(self) -> list[Hashable]:
        granted = []
        while self.waiting and self.used + self.waiting[0][1] <= self.total:
            owner, size = self.waiting.popleft()
            self.used += size
            granted.append(owner)
        return granted
