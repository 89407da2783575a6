"""The agent's ``install`` step: receive a signed package over the cable (resumable), then install it.

A mixin of :class:`edgert.provision.agent.Agent`: ``install_begin`` answers the offset to resume
from, DATA chunks append to ``<state>/provision/incoming/<sha256>.part``, ``install_commit`` checks
size and SHA-256 and hands the package to the store and the Deployer like any other update.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from edgert.provision.session import DeviceRefusal, ErrorCode
from edgert.security.atomic import ensure_private_dir

__all__ = ["MAX_PACKAGE_BYTES", "InstallSteps"]

MAX_PACKAGE_BYTES = 512 * 1024 * 1024


class InstallSteps:
    """``install_begin`` / DATA / ``install_commit`` on an agent's state directory."""

    root: Path
    dir: Path
    profile: str
    _transfer: dict[str, Any] | None

    def _need(self, *steps: str) -> None:
        raise NotImplementedError

    def _audit(self, event: str, **fields: Any) -> None:
        raise NotImplementedError

    def _keys(self) -> Any:
        raise NotImplementedError

    def _step_done(self, step: str, **extra: Any) -> None:
        raise NotImplementedError

    def op_install_begin(self, args: dict[str, Any]) -> dict[str, Any]:
        """Start (or resume) receiving a package; answers the offset to continue from."""
        self._need("keys")
        size, digest = int(args["size"]), str(args["sha256"]).lower()
        if (
            not 0 < size <= MAX_PACKAGE_BYTES
            or len(digest) != 64
            or not all(c in "0123456789abcdef" for c in digest)
        ):
            raise DeviceRefusal(
                ErrorCode.BAD_ARGS,
                f"package size {size} or hash is invalid",
                hint=f"packages up to {MAX_PACKAGE_BYTES} bytes",
            )
        incoming = ensure_private_dir(self.dir / "incoming")
        part = incoming / f"{digest}.part"
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        self._transfer = {"path": part, "size": size, "sha256": digest, "name": str(args.get("name", ""))}
        self._audit("install_begin", package=self._transfer["name"], size=size, resume_from=have)
        return {"offset": have}

    def data(self, offset: int, chunk: bytes) -> dict[str, Any]:
        """One chunk of the current transfer (a repeated or stale chunk is ignored)."""
        t = self._transfer
        if t is None:
            raise DeviceRefusal(
                ErrorCode.OUT_OF_ORDER, "no transfer in progress", hint="send install_begin first"
            )
        part: Path = t["path"]
        have = part.stat().st_size if part.exists() else 0
        if offset == have and have + len(chunk) <= t["size"]:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, chunk)
            finally:
                os.close(fd)
            have += len(chunk)
        return {"next": have}

    def op_install_commit(self, args: dict[str, Any]) -> dict[str, Any]:
        """Verify the received package, install it (not yet active) and serve it via the Deployer."""
        from edgert.device.control import deploy_from_cli
        from edgert.security.loader import open_audit, open_store

        t = self._transfer
        if t is None:
            raise DeviceRefusal(
                ErrorCode.OUT_OF_ORDER, "no transfer in progress", hint="send install_begin first"
            )
        part: Path = t["path"]
        h = hashlib.sha256()
        with open(part, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        if part.stat().st_size != t["size"] or h.hexdigest() != t["sha256"]:
            raise DeviceRefusal(
                ErrorCode.TRANSFER,
                f"received {part.stat().st_size} of {t['size']} bytes or the SHA-256 differs",
                hint="run the install step again; it resumes",
            )
        keys = self._keys()
        with open_audit(self.root, keys) as audit:
            store = open_store(self.root, keys, audit)
            manifest = store.install(part, activate=False)
            outcome = deploy_from_cli(
                store,
                manifest.name,
                manifest.version,
                socket_path=None,
                profile=self.profile,
                audit=audit.append,
            )
        part.unlink()
        self._transfer = None
        self._step_done("install")
        self._audit("install", model=manifest.name, version=manifest.version, active=outcome.version)
        return {"model": manifest.name, "version": manifest.version, "note": outcome.message}
