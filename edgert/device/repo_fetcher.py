"""python-tuf's ``FetcherInterface`` over the fleet's MQTT repository topics.

:class:`RepoRequester` correlates requests (published on ``edgert/v1/F/repo/req/D``) with replies
(``edgert/v1/F/devices/D/repo``, fed to :meth:`RepoRequester.handle_reply` from the MQTT network
thread). Each chunk is asked for at an explicit offset, waited for with a timeout and asked again a
bounded number of times, so a broker restart mid-download only costs a retry.

:class:`MqttFetcher` turns a URL such as ``mqtt:targets/models/digits/<sha256>.2.edgepkg`` into chunk
requests. Targets are written to a partial file in ``partial_dir`` as they arrive, so a download that
stops (timeout, reconnect, SIGKILL) resumes from where it was; TUF still checks length and hashes of
the whole file, and a file that fails that check is deleted so the next attempt starts clean. Every
download is bounded by the length TUF allows and by :data:`MAX_FETCH_BYTES`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from tuf.api import exceptions as tuf_errors
from tuf.ngclient.fetcher import FetcherInterface

from edgert.errors import SyncError
from edgert.mqtt.repo_protocol import (
    MAX_CHUNK,
    RepoProtocolError,
    RepoReply,
    RepoRequest,
    check_repo_path,
    decode_reply,
    encode_request,
    reply_topic,
    request_topic,
)
from edgert.security.atomic import ensure_private_dir

__all__ = [
    "MAX_FETCH_BYTES",
    "REQUEST_ATTEMPTS",
    "REQUEST_TIMEOUT_S",
    "URL_SCHEME",
    "MqttFetcher",
    "RepoFetchError",
    "RepoRequester",
    "RepoTimeoutError",
]

log = logging.getLogger("edgert.device.repo_fetcher")

#: How long one chunk request waits for its reply before it is sent again (seconds).
REQUEST_TIMEOUT_S = 10.0
#: Attempts per chunk (the first plus retries) before the download fails.
REQUEST_ATTEMPTS = 4
#: Pause before a retry, doubled each time, capped at REQUEST_TIMEOUT_S (seconds).
RETRY_PAUSE_S = 0.25
#: No single download is larger than this, whatever TUF allows (bytes).
MAX_FETCH_BYTES = 2 << 30
#: The scheme of repository URLs given to python-tuf's Updater ("mqtt:metadata/", "mqtt:targets/").
URL_SCHEME = "mqtt:"
#: Bytes written to a partial file between fsyncs (resume loses at most this much on power loss).
FSYNC_EVERY = 1 << 20


class RepoFetchError(SyncError, tuf_errors.DownloadError):
    """A repository request failed: the controller answered with an error, or the reply was wrong."""


class RepoTimeoutError(RepoFetchError):
    """A chunk never arrived within the attempts allowed."""


class _Slot:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.reply: RepoReply | None = None


class RepoRequester:
    """Request/response over MQTT for one device: ``request(path, offset, length) -> RepoReply``."""

    def __init__(self, publish: Callable[[str, bytes], Any], *, fleet: str, device: str,
                 timeout_s: float = REQUEST_TIMEOUT_S, attempts: int = REQUEST_ATTEMPTS,
                 retry_pause_s: float = RETRY_PAUSE_S) -> None:
        self.publish = publish
        self.request_topic = request_topic(fleet, device)
        self.reply_topic = reply_topic(fleet, device)
        self.timeout_s, self.attempts, self.retry_pause_s = timeout_s, attempts, retry_pause_s
        self._lock = threading.Lock()
        self._pending: dict[str, _Slot] = {}
        self.counters = {"requests": 0, "retries": 0, "stale_replies": 0, "bad_replies": 0}

    def handle_reply(self, payload: bytes) -> None:
        """Deliver one reply (MQTT network thread); unknown, late and malformed replies are dropped."""
        try:
            reply = decode_reply(payload)
        except RepoProtocolError as exc:
            self.counters["bad_replies"] += 1
            log.warning("malformed repository reply dropped", extra={"error": exc.message})
            return
        with self._lock:
            slot = self._pending.get(reply.id)
        if slot is None:
            self.counters["stale_replies"] += 1
            return
        slot.reply = reply
        slot.event.set()

    def request(self, path: str, offset: int, length: int) -> RepoReply:
        """Ask for ``length`` bytes of ``path`` at ``offset``; retry on silence; raise RepoTimeoutError."""
        slot, ids = _Slot(), []
        pause = self.retry_pause_s
        try:
            for attempt in range(self.attempts):
                rid = secrets.token_hex(8)
                ids.append(rid)
                with self._lock:  # earlier attempts' ids stay live: a late reply to them is as good
                    self._pending[rid] = slot
                self.counters["requests"] += 1
                self.counters["retries"] += attempt > 0
                try:
                    self.publish(self.request_topic, encode_request(RepoRequest(rid, path, offset, length)))
                except SyncError as exc:
                    log.warning("cannot send repository request", extra={"error": exc.message})
                if slot.event.wait(self.timeout_s):
                    assert slot.reply is not None
                    return slot.reply
                log.warning("repository request timed out; asking again", extra={
                    "path": path, "offset": offset, "attempt": attempt + 1, "attempts": self.attempts})
                if attempt + 1 < self.attempts and slot.event.wait(pause):
                    assert slot.reply is not None
                    return slot.reply
                pause = min(pause * 2, self.timeout_s)
        finally:
            with self._lock:
                for rid in ids:
                    self._pending.pop(rid, None)
        raise RepoTimeoutError(
            f"no reply from the fleet repository for {path} at offset {offset} after {self.attempts} "
            f"attempts of {self.timeout_s:g} s",
            hint="check that the broker is reachable and the controller ('edgert fleet serve') runs; "
                 "the download resumes from this offset on the next try")


class MqttFetcher(FetcherInterface):
    """A python-tuf fetcher over :class:`RepoRequester`; targets resume from a partial file."""

    def __init__(self, requester: RepoRequester, *, partial_dir: str | os.PathLike[str] | None = None,
                 chunk_size: int = MAX_CHUNK, max_bytes: int = MAX_FETCH_BYTES,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self.requester = requester
        self.partial_dir = Path(partial_dir) if partial_dir is not None else None
        self.chunk_size = max(1, min(chunk_size, MAX_CHUNK))
        self.max_bytes = max_bytes
        self.on_progress = on_progress

    @staticmethod
    def repo_path(url: str) -> str:
        """``mqtt:targets/x`` -> ``targets/x`` (validated); RepoFetchError for anything else."""
        if not url.startswith(URL_SCHEME):
            raise RepoFetchError(f"{url[:80]!r} is not a repository URL (expected {URL_SCHEME}metadata/...)")
        path = url[len(URL_SCHEME):].lstrip("/")
        try:
            check_repo_path(path)
        except RepoProtocolError as exc:
            raise RepoFetchError(exc.message) from None
        return path

    def chunks(self, path: str, offset: int = 0, limit: int | None = None) -> Iterator[bytes]:
        """Yield ``path`` from ``offset`` to its end in chunks; never more than ``limit`` bytes in all."""
        limit = self.max_bytes if limit is None else min(limit, self.max_bytes)
        total: int | None = None
        while total is None or offset < total:
            want = self.chunk_size if total is None else min(self.chunk_size, total - offset)
            reply = self.requester.request(path, offset, max(1, want))
            if reply.status == "not_found":
                raise tuf_errors.DownloadHTTPError(reply.message or f"{path} not found", 404)
            if reply.status != "ok":
                raise RepoFetchError(f"the fleet repository refused {path}: {reply.message or 'error'}")
            if total is not None and reply.total != total:
                raise RepoFetchError(f"{path} changed size during the download ({total} -> {reply.total})",
                                     hint="the repository was updated; the download starts again")
            total = reply.total
            if total > limit:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"{path} is {total} bytes, over the {limit} bytes allowed")
            if reply.offset != offset or len(reply.data) > want or (not reply.data and offset < total):
                raise RepoFetchError(f"the fleet repository answered {path} at offset {reply.offset} with "
                                     f"{len(reply.data)} bytes; expected offset {offset}, up to {want} bytes")
            offset += len(reply.data)
            if self.on_progress is not None:
                self.on_progress(path, offset, total)
            if reply.data:
                yield reply.data

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.chunks(self.repo_path(url))

    @contextlib.contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """Download ``url`` (at most ``max_length`` bytes); targets resume from their partial file."""
        path = self.repo_path(url)
        if self.partial_dir is not None:
            ensure_private_dir(self.partial_dir)
        if self.partial_dir is None or not path.startswith("targets/"):
            with tempfile.TemporaryFile(dir=self.partial_dir) as tmp:
                self._fill(tmp, path, 0, max_length)
                tmp.seek(0)
                yield tmp
            return
        part = self.partial_dir / (quote(path, safe="") + ".part")
        fd = os.open(part, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "r+b") as f:
            have = f.seek(0, os.SEEK_END)
            if have > max_length:
                f.truncate(0)
                have = f.seek(0)
            ok = False
            try:
                self._fill(f, path, have, max_length)
                f.seek(0)
                yield f
                ok = True
            except (tuf_errors.RepositoryError, tuf_errors.DownloadLengthMismatchError):
                ok = True  # the bytes are wrong, not missing: never resume from them
                with contextlib.suppress(OSError):
                    part.unlink()
                raise
            finally:
                if ok:
                    with contextlib.suppress(OSError):
                        part.unlink()

    def _fill(self, f: IO[bytes], path: str, offset: int, max_length: int) -> None:
        if offset:
            log.info("resuming download", extra={"path": path, "offset": offset})
        unsynced = 0
        for chunk in self.chunks(path, offset, max_length):
            f.write(chunk)
            unsynced += len(chunk)
            if unsynced >= FSYNC_EVERY:
                f.flush()
                os.fsync(f.fileno())
                unsynced = 0
        f.flush()
        os.fsync(f.fileno())



class RoutingFetcher(FetcherInterface):
    """``mqtt:`` URLs through the MQTT fetcher, anything else (a CDN, a bucket, any static HTTP(S) server)
    through python-tuf's own fetcher. Key records stay on MQTT: only the controller can make them."""

    def __init__(self, mqtt: MqttFetcher, http: FetcherInterface | None = None) -> None:
        from tuf.ngclient import Urllib3Fetcher

        self.mqtt = mqtt
        self.http = http or Urllib3Fetcher()

    def _fetch(self, url: str) -> Iterator[bytes]:
        return (self.mqtt if url.startswith(URL_SCHEME) else self.http)._fetch(url)

    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:  # type: ignore[override]
        """Resumable for ``mqtt:`` URLs; python-tuf's own download for the others."""
        fetcher = self.mqtt if url.startswith(URL_SCHEME) else self.http
        return fetcher.download_file(url, max_length)  # type: ignore[return-value]
