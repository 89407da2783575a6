"""An in-memory port joined to an agent: ``edgert provision local`` runs the same flow without a cable."""

from __future__ import annotations

from typing import Any

from edgert import __version__
from edgert.provision.session import DeviceSession

__all__ = ["LocalPort"]


class LocalPort:
    """Bytes written go straight to a :class:`DeviceSession`; its answers come back on read."""

    def __init__(self, agent: Any) -> None:
        self.session = DeviceSession(
            agent.handle, agent.data, hello_info={"agent": f"edgert {__version__} (local)"}
        )
        self.buf = bytearray()
        self.timeout: float | None = 0.0

    def write(self, data: bytes) -> int:
        """Deliver ``data`` to the device session."""
        self.buf += self.session.receive(bytes(data))
        return len(data)

    @property
    def in_waiting(self) -> int:
        """Bytes ready to read."""
        return len(self.buf)

    def read(self, size: int = 1) -> bytes:
        """Answers waiting (never blocks)."""
        out = bytes(self.buf[:size])
        del self.buf[:size]
        return out
