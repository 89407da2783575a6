"""Write back-pressure shared by the HTTP and Unix-socket servers' connection protocols.

While a client leaves more than ``write_high_water`` bytes unsent, asyncio calls ``pause_writing``:
the connection stops reading and answering until the client reads (``resume_writing``), and is
dropped after ``write_timeout_s``; unread output past ``max_output_bytes`` drops it at once.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["NO_DEADLINE", "WritePressure"]

#: A deadline that never comes (monotonic seconds).
NO_DEADLINE = float("inf")


class WritePressure:
    """Mixin for an ``asyncio.Protocol`` with ``limits`` (write_timeout_s, max_output_bytes), ``busy``,
    ``_next()`` (answer what is queued), ``_drop(reason)``, ``_update_reading()`` and
    ``_resume_input()`` (carry on with input after a pause)."""

    limits: Any
    busy: bool
    write_paused: bool = False
    held_large: bool = False
    write_deadline: float = NO_DEADLINE

    def pause_writing(self) -> None:
        """More than write_high_water is unsent: stop reading and answering until the client reads."""
        self.write_paused = True
        self.held_large = True
        self.write_deadline = time.monotonic() + self.limits.write_timeout_s
        self._update_reading()

    def resume_writing(self) -> None:
        """The client read what was sent: answer what is queued, then carry on with input."""
        self.write_paused = False
        self.write_deadline = NO_DEADLINE
        if not self.busy:
            self._next()
        self._resume_input()

    def output_over_cap(self, transport: Any, what: str) -> bool:
        """Drop the client (True) when more than max_output_bytes of its ``what`` sit unread."""
        if transport.get_write_buffer_size() <= self.limits.max_output_bytes:
            return False
        # Backstop: back-pressure should never let unread output grow this far.
        self._drop(f"client left more than {self.limits.max_output_bytes} bytes of {what} unread")
        return True

    # -- provided by the protocol class ---------------------------------------------------------------
    def _next(self) -> None:
        raise NotImplementedError

    def _drop(self, reason: str) -> None:
        raise NotImplementedError

    def _update_reading(self) -> None:
        raise NotImplementedError

    def _resume_input(self) -> None:
        raise NotImplementedError
