"""Deployments asked for from the command line: through the running daemon, or offline.

``edgert models import|activate|rollback`` never change the store's active pointer by themselves.
When a daemon answers on its socket, its Deployer does the work (load, health check, swap, commit).
When none does, an offline Deployer (no engine) loads and health-checks the version on this device
with its profile, then commits: a version becomes active only once it has really loaded here.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from edgert.config import ModelEntry
from edgert.device.deployer import Deployer, Deployment
from edgert.device.sources import ModelSource
from edgert.errors import EdgertError, ServeError

__all__ = ["DAEMON_DEPLOY_TIMEOUT_S", "Outcome", "deploy_from_cli"]

#: How long the CLI waits for the daemon to load, health-check and swap a version.
DAEMON_DEPLOY_TIMEOUT_S = 120.0


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


def _via_daemon(name: str, version: str | None, allow_downgrade: bool, socket_path: str | None) -> str | None:
    """Ask the daemon on ``socket_path`` to serve ``name``; None when it did, else why it was not asked."""
    from edgert.client import Client

    if not socket_path:
        return "the daemon socket is disabled"
    try:
        client = Client(f"unix://{socket_path}", timeout=DAEMON_DEPLOY_TIMEOUT_S)
    except ServeError:
        return f"no daemon listening on {socket_path}"
    with client:
        if name not in client.status().get("models", {}):
            return f"the daemon at {socket_path} does not serve {name}"
        try:
            client.load(name, version, allow_downgrade=allow_downgrade)
        except EdgertError as exc:
            raise type(exc)(f"the daemon at {socket_path} kept serving the previous version of {name}; "
                            f"nothing changed: {exc.message}", hint=exc.hint) from None
    return None


def deploy_from_cli(store: Any, name: str, version: str | None, *, allow_downgrade: bool = False,
                    reason: str = "activate", socket_path: str | None, profile: str = "auto",
                    audit: Any = None) -> Outcome:
    """Serve ``name`` at ``version`` via the daemon on ``socket_path`` if one answers, else offline.

    ``reason="rollback"`` serves the store's previous version. Raises the Deployer's error (nothing
    changed) when the version does not load, fails its health check or is below the floor.
    """
    audit = audit or (lambda *a, **k: None)
    if reason == "rollback":
        version = store.entry(name).previous
        if version is None:
            from edgert.errors import StoreError

            raise StoreError(f"model {name!r} has no previous version to roll back to",
                             hint="'edgert models list' shows installed versions")
        allow_downgrade = True
    note = _via_daemon(name, version, allow_downgrade, socket_path)
    if note is None:
        served = store.entry(name).active
        return Outcome(name, str(served), True, f"the daemon at {socket_path} now serves {name} {served}")
    if reason != "rollback" and version is not None and store.entry(name).active == version:
        return Outcome(name, version, False, f"{note}; {name} {version} is already active")
    done = _offline(store, name, version, allow_downgrade=allow_downgrade, reason=reason, profile=profile,
                    audit=audit)
    when = ("it serves once the daemon config has a [[models]] entry for it" if "does not serve" in note
            else "it serves when the daemon (re)starts")
    return Outcome(name, done.version, False,
                   f"{note}; {name} {done.version} ({done.variant}) loaded and passed its health check on "
                   f"this device, and is active: {when}", done)
