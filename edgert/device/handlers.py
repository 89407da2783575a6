"""Handlers for the daemon's MQTT commands: ``activate-model``, ``rollback-model``, ``reboot-daemon``.

Model changes go through the daemon's :class:`~edgert.device.deployer.Deployer`, the one owner of
which version serves: it checks the anti-rollback floor, loads, health-checks, swaps and only then
commits the store, so a failed command changes nothing. Handlers run on the sync service's command
thread, never on the event loop, so they wait for the deployment on the daemon's loop.
``restart`` asks for a graceful restart (drain, stop, re-exec); it is called :data:`REBOOT_DELAY_S`
after the handler returns, so the reply is published first.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from edgert.device.commands import Handler
from edgert.device.deployer import Deployer

__all__ = ["REBOOT_DELAY_S", "daemon_handlers"]

#: Delay between answering ``reboot-daemon`` and asking the daemon to restart (the reply goes out first).
REBOOT_DELAY_S = 1.0


def _text(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value or len(value) > 128:
        raise ValueError(f"args.{key} must be a non-empty string of at most 128 characters")
    return value


def daemon_handlers(
    *,
    deployer: Deployer,
    restart: Callable[[], None],
    reboot_delay_s: float = REBOOT_DELAY_S,
) -> dict[str, Handler]:
    """The three daemon-backed command handlers, ready for ``SyncService(handlers=…)``."""

    def activate(args: Mapping[str, Any]) -> Mapping[str, Any]:
        name, version = _text(args, "model"), _text(args, "version")
        downgrade = args.get("allow_downgrade", False)
        if not isinstance(downgrade, bool):
            raise ValueError("args.allow_downgrade must be true or false")
        done = deployer.run_threadsafe(
            deployer.deploy(name, version, allow_downgrade=downgrade, origin="mqtt", reason="activate"))
        return {"model": name, "version": done.version, "previous": done.previous, "changed": done.changed,
                "variant": done.variant}

    def rollback(args: Mapping[str, Any]) -> Mapping[str, Any]:
        name = _text(args, "model")
        done = deployer.run_threadsafe(deployer.rollback(name, origin="mqtt"))
        return {"model": name, "version": done.version, "previous": done.previous, "variant": done.variant}

    def reboot(args: Mapping[str, Any]) -> Mapping[str, Any]:
        timer = threading.Timer(reboot_delay_s, restart)
        timer.daemon = True  # a stopping process must not wait for it
        timer.start()
        return {"restarting": True, "delay_s": reboot_delay_s}

    return {"activate-model": activate, "rollback-model": rollback, "reboot-daemon": reboot}
