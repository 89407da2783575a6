"""Handlers for the daemon's MQTT commands: ``activate-model``, ``rollback-model``, ``reboot-daemon``.

The daemon passes in what they act on (pure logic here; the daemon owns the I/O):

* ``models``: the running engine (:class:`ModelControl`): which version serves, and a blocking hot swap;
* ``open_store``: a context manager yielding the device's model store (:class:`StoreControl`), opened
  per command with its audit log, like ``edgert models activate|rollback`` does;
* ``restart``: asks for a graceful restart (drain, stop, re-exec); it is called
  :data:`REBOOT_DELAY_S` after the handler returns, so the reply is published first.

The store and the running daemon are kept in step: the store is changed first (anti-rollback is
enforced there), then the daemon swaps; if the swap fails the store is put back, so what the store
calls active is what serves. Handlers run on the sync service's command thread, never on the event
loop, so a blocking swap is fine.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from edgert.device.commands import Handler

__all__ = ["REBOOT_DELAY_S", "ModelControl", "StoreControl", "daemon_handlers"]

#: Delay between answering ``reboot-daemon`` and asking the daemon to restart (the reply goes out first).
REBOOT_DELAY_S = 1.0


class ModelControl(Protocol):
    """The running daemon's models."""

    def served_version(self, name: str) -> str | None:
        """The version of ``name`` serving now, or None if it is not loaded."""

    def swap(self, name: str, version: str) -> None:
        """Load ``version``, warm it up and swap it in (blocking); raise EdgertError and keep the old one."""


class StoreControl(Protocol):
    """The subset of :class:`edgert.security.store.ModelStore` the handlers use."""

    def activate(self, name: str, version: str, *, allow_downgrade: bool = False) -> None:
        """Make an installed version active."""

    def rollback(self, name: str) -> str:
        """Swap active and previous; return the new active version."""


def _text(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ValueError(f"args.{key} must be a non-empty string of at most 128 characters")
    return value


def daemon_handlers(
    *,
    models: ModelControl,
    open_store: Callable[[], AbstractContextManager[StoreControl]],
    restart: Callable[[], None],
    reboot_delay_s: float = REBOOT_DELAY_S,
) -> dict[str, Handler]:
    """The three daemon-backed command handlers, ready for ``SyncService(handlers=…)``."""

    def activate(args: Mapping[str, Any]) -> Mapping[str, Any]:
        name, version = _text(args, "model"), _text(args, "version")
        downgrade = args.get("allow_downgrade", False)
        if not isinstance(downgrade, bool):
            raise ValueError("args.allow_downgrade must be true or false")
        previous = models.served_version(name)
        with open_store() as store:
            store.activate(name, version, allow_downgrade=downgrade)
            try:
                models.swap(name, version)
            except BaseException:
                if previous is not None and previous != version:
                    store.activate(name, previous, allow_downgrade=True)
                raise
        return {"model": name, "version": version, "previous": previous}

    def rollback(args: Mapping[str, Any]) -> Mapping[str, Any]:
        name = _text(args, "model")
        previous = models.served_version(name)
        with open_store() as store:
            version = store.rollback(name)
            try:
                models.swap(name, version)
            except BaseException:
                store.rollback(name)  # swap active/previous back: the store matches what serves
                raise
        return {"model": name, "version": version, "previous": previous}

    def reboot(args: Mapping[str, Any]) -> Mapping[str, Any]:
        timer = threading.Timer(reboot_delay_s, restart)
        timer.daemon = True  # a stopping process must not wait for it
        timer.start()
        return {"restarting": True, "delay_s": reboot_delay_s}

    return {"activate-model": activate, "rollback-model": rollback, "reboot-daemon": reboot}
