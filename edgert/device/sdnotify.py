"""systemd readiness and watchdog notification, written to the sd_notify protocol (no dependency).

A notification is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET``; a leading ``@`` means the Linux abstract namespace.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]

log = logging.getLogger("edgert.device.sdnotify")


def socket_address(value: str) -> str | bytes | None:
    """The address to send to for a ``$NOTIFY_SOCKET`` value (None when unusable)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms are not used on devices


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of ``$WATCHDOG_USEC``, or None when not asked for."""
    usec = env.get("WATCHDOG_USEC", "")
    owner = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if owner and owner.isdigit() and int(owner) != pid:
        return None  # the watchdog is meant for another process (e.g. our parent)
    return int(usec) / 2_000_000


class Notifier:
    """Send sd_notify messages; a silent no-op when not run under systemd with Type=notify."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.address = socket_address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_s = watchdog_interval(env, os.getpid())

    @property
    def enabled(self) -> bool:
        """True when $NOTIFY_SOCKET names a socket."""
        return self.address is not None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; returns False (and logs once) on failure."""
        if self.address is None:
            return False
        payload = "\n".join(lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.connect(self.address)
                sock.sendall(payload)
        except OSError as exc:
            log.warning("sd_notify failed", extra={"error": str(exc)})
            return False
        return True

    def ready(self, status: str = "serving") -> bool:
        """READY=1 with a STATUS line."""
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def reloading(self) -> bool:
        """RELOADING=1 (SIGHUP handling)."""
        return self.notify("RELOADING=1")

    def stopping(self) -> bool:
        """STOPPING=1 (SIGTERM handling)."""
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        """WATCHDOG=1 keep-alive ping."""
        return self.notify("WATCHDOG=1")
