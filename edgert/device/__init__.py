"""The edgert serving daemon (``edgert daemon`` and ``edgert demo``)."""

from __future__ import annotations

from edgert.device.daemon import Daemon, Service

__all__ = ["Daemon", "Service"]
