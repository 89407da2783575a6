"""Deployments asked for from the command line: through the running daemon, or offline.

``edgert models import|activate|rollback`` never change the store's active pointer by themselves.
When a daemon answers on its socket, its Deployer does the work (load, health check, swap, commit).
When none does, an offline Deployer (no engine) loads and health-checks the version on this device
with its profile, then commits: a version becomes active only once it has really loaded here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert.config import ModelEntry
from edgert.device.deployer import Deployer, Deployment
from edgert.device.sources import ModelSource
from edgert.errors import EdgertError, UnknownModelError

__all__ = ["Outcome", "deploy_from_cli"]


@dataclass(frozen=True)
class Outcome:
    """What happened, for the CLI to print."""

    model: str
    version: str
    served_by_daemon: bool
    message: str
    deployment: Deployment | None = None


def _offline(store: Any, name: str, version: str | None, *, allow_downgrade: bool, reason: str,
             profile: str, audit: Any) -> Deployment:
    from edgert.runtime import Runtime

    runtime = Runtime(profile=profile)
    entry = ModelEntry(name=name)
    deployer = Deployer(
        source=ModelSource(runtime, lambda: store),
        target=None,
        audit=audit,
        models=lambda: (entry,),
        preferred_variants=tuple(getattr(runtime.profile, "variants", ()) or ()),
    )
    if reason == "rollback":
        return asyncio.run(deployer.rollback(name, origin="cli"))
    return asyncio.run(deployer.deploy(name, version, allow_downgrade=allow_downgrade, origin="cli",
                                       reason=reason))


def deploy_from_cli(store: Any, name: str, version: str | None, *, allow_downgrade: bool = False,
                    reason: str = "activate", socket_path: str | None, profile: str = "auto",
                    audit: Any = None) -> Outcome:
    """Serve ``name`` at ``version`` via the daemon on ``socket_path`` if one answers, else offline.

    ``reason="rollback"`` serves the store's previous version. Raises the Deployer's error (nothing
    changed) when the version does not load, fails its health check or is below the floor.
    """
    from edgert.client import notify_daemon_activate

    audit = audit or (lambda *a, **k: None)
    if reason == "rollback":
        version = store.entry(name).previous
        if version is None:
            from edgert.errors import StoreError

            raise StoreError(f"model {name!r} has no previous version to roll back to",
                             hint="'edgert models list' shows installed versions")
        allow_downgrade = True
    if socket_path and Path(socket_path).exists():
        try:
            reached = notify_daemon_activate(name, version, socket_path, allow_downgrade=allow_downgrade)
        except UnknownModelError:
            reached = None  # the daemon does not serve this name: the store alone decides
        except EdgertError as exc:
            raise type(exc)(f"the daemon at {socket_path} kept serving the previous version of {name}; "
                            f"nothing changed: {exc.message}", hint=exc.hint) from None
        if reached:
            served = store.entry(name).active
            return Outcome(name, str(served), True, f"the daemon at {socket_path} now serves {name} {served}")
        note = (f"the daemon at {socket_path} does not serve {name}" if reached is None
                else f"no daemon listening on {socket_path}")
    else:
        note = f"no daemon listening on {socket_path}" if socket_path else "the daemon socket is disabled"
    if reason != "rollback" and version is not None and store.entry(name).active == version:
        return Outcome(name, version, False, f"{note}; {name} {version} is already active")
    done = _offline(store, name, version, allow_downgrade=allow_downgrade, reason=reason, profile=profile,
                    audit=audit)
    return Outcome(name, done.version, False,
                   f"{note}; {name} {done.version} ({done.variant}) loaded and passed its health check on "
                   "this device, and is active: it serves when the daemon (re)starts", done)
