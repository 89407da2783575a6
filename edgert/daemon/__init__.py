"""The edgert serving daemon (``edgert daemon`` and ``edgert demo``)."""

from __future__ import annotations

from edgert.daemon.core import Daemon, Service

__all__ = ["Daemon", "Service"]
