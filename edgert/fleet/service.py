"""``edgert fleet serve`` for a fleet directory: the rollout controller plus what it serves to devices.

The controller (rollouts, fleet state) shares one MQTT link with the repository responder, which
answers devices' TUF metadata, target and key-record requests over MQTT, and keeps the repository's
timestamp (and snapshot) signed before they expire so devices never see frozen metadata.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from edgert.errors import EdgertError
from edgert.fleet.fleetdir import FleetDir

__all__ = ["REFRESH_CHECK_S", "MetadataKeeper", "RepoAttachment"]

log = logging.getLogger("edgert.fleet.service")

#: How often the keeper checks the timestamp and snapshot expiry (s).
REFRESH_CHECK_S = 300.0
#: Re-sign a role when less than this fraction of its lifetime is left.
REFRESH_MARGIN = 0.5


class RepoAttachment:
    """The repository responder (edgert.mqtt.repo_server) as a controller attachment, with key records."""

    def __init__(self, fleet: FleetDir) -> None:
        self.fleet = fleet
        self._server: Any = None
        self._lock = threading.Lock()

    def topics(self, fleet: str) -> Sequence[str]:
        """The repository request filter of this fleet."""
        from edgert.mqtt.repo_protocol import request_filter

        return [request_filter(fleet)]

    def _key_record(self, device: str, target: str) -> bytes | None:
        """A device's wrapped key for ``target``; None (not found) for an unknown device or target."""
        from edgert.fleet.keyrecords import wrapped_key_record

        try:
            return json.dumps(wrapped_key_record(self.fleet, device, target)).encode("utf-8")
        except EdgertError as exc:
            log.warning("no key record", extra={"device": device, "target": target, "error": exc.message})
            return None

    def handle(self, topic: str, payload: bytes, publish: Any) -> None:
        """Answer one repository request (bounded chunks; paths outside the repository are refused)."""
        with self._lock:
            if self._server is None:
                from edgert.mqtt.repo_server import RepoServer

                self._server = RepoServer(self.fleet.repository_dir, self.fleet.id,
                                          lambda t, p: publish(t, p, False), key_records=self._key_record)
        self._server.handle_message(topic, payload)


class MetadataKeeper:
    """A thread that re-signs timestamp and snapshot metadata before they expire (TUF freeze protection)."""

    def __init__(self, fleet: FleetDir, check_s: float = REFRESH_CHECK_S) -> None:
        self.fleet, self.check_s = fleet, check_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self, now: datetime | None = None) -> list[str]:
        """Refresh what is due; return the roles re-signed."""
        from edgert.fleet.repository import TufRepository

        now = now or datetime.now(timezone.utc)
        repo = TufRepository(self.fleet)
        done = []
        for role, refresh in (("snapshot", repo.refresh_snapshot), ("timestamp", repo.refresh_timestamp)):
            meta = repo.load(role)
            lifetime = self.fleet.expires.get(role, timedelta(days=1))
            if meta.signed.expires - now < lifetime * REFRESH_MARGIN:
                refresh(now)
                done.append(role)
        if done:
            log.info("repository metadata re-signed", extra={"roles": done})
        return done

    def start(self) -> None:
        """Check now, then every ``check_s``."""
        self._thread = threading.Thread(target=self._run, name="edgert-tuf-keeper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:  # keep serving; the next check retries
                log.exception("cannot re-sign repository metadata")
            if self._stop.wait(self.check_s):
                return

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
