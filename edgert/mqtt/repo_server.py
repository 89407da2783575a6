"""The controller side of the repository topics: serve a static TUF repository directory in bounded chunks.

:class:`RepoServer` answers ``edgert/v1/F/repo/req/D`` on ``edgert/v1/F/devices/D/repo`` (see
:mod:`edgert.mqtt.repo_protocol`). It serves ``ROOT/metadata/*`` and ``ROOT/targets/**`` read-only
and never anything outside them: ``..``, absolute paths, odd characters, symbolic links that lead
out of the directory and anything but regular files are refused. ``keys/<target path>`` is answered
by a callable the fleet side supplies (the device's wrapped-key record, made on demand).

It works with a raw paho client (:meth:`attach_paho`) or with :class:`~edgert.mqtt.client.MqttLink`
(route ``on_message`` to :meth:`handle_message` and call :meth:`subscribe` from ``on_connect``).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgert.errors import SyncError
from edgert.mqtt.repo_protocol import (
    MAX_CHUNK,
    RepoProtocolError,
    RepoReply,
    check_repo_path,
    decode_request,
    encode_reply,
    reply_topic,
    request_device,
    request_filter,
)

__all__ = ["KeyRecords", "RepoServer"]

log = logging.getLogger("edgert.mqtt.repo_server")

#: ``key_records(device, target_path) -> bytes | None``: the device's wrapped-key record (JSON) or None.
KeyRecords = Callable[[str, str], "bytes | None"]
Publish = Callable[[str, bytes], Any]


class RepoServer:
    """Answers repository requests from ``root`` (a FLEET/repository directory) for one fleet."""

    def __init__(self, root: str | os.PathLike[str], fleet: str, publish: Publish, *,
                 key_records: KeyRecords | None = None, max_chunk: int = MAX_CHUNK) -> None:
        self.root = Path(os.path.realpath(root))
        self.fleet = fleet
        self.publish = publish
        self.key_records = key_records
        self.max_chunk = min(max_chunk, MAX_CHUNK)
        self.counters = {"requests": 0, "bytes": 0, "not_found": 0, "refused": 0, "errors": 0}

    # -- wiring -------------------------------------------------------------------------------------
    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to (renew them after every reconnect)."""
        return [request_filter(self.fleet)]

    def subscribe(self, client: Any) -> None:
        """Subscribe ``client`` (paho Client or MqttLink) to the request topics with QoS 1."""
        for topic in self.subscriptions():
            client.subscribe(topic, qos=1)

    def attach_paho(self, client: Any) -> None:
        """Route a paho client's request messages here and subscribe now (call again after reconnects)."""
        def on_request(_client: Any, _userdata: Any, msg: Any) -> None:
            self.handle_message(msg.topic, bytes(msg.payload))

        client.message_callback_add(request_filter(self.fleet), on_request)
        self.subscribe(client)

    # -- requests -----------------------------------------------------------------------------------
    def handle_message(self, topic: str, payload: bytes) -> bool:
        """Answer one request message; False if ``topic`` is not a request topic of this fleet."""
        device = request_device(topic, self.fleet)
        if device is None:
            return False
        reply = self.answer(device, payload)
        if reply is None:
            return True
        try:
            self.publish(reply_topic(self.fleet, device), encode_reply(reply))
        except (SyncError, OSError, ValueError) as exc:
            self.counters["errors"] += 1
            log.warning("cannot publish repository reply", extra={"device": device, "error": str(exc)[:200]})
        return True

    def answer(self, device: str, payload: bytes) -> RepoReply | None:
        """The reply to one request of ``device`` (None when the request cannot even be correlated)."""
        self.counters["requests"] += 1
        try:
            req = decode_request(payload)
        except RepoProtocolError as exc:
            self.counters["refused"] += 1
            log.warning("malformed repository request", extra={"device": device, "error": exc.message})
            return None  # without a valid id the device could not match a reply; it times out
        try:
            if req.path.startswith("keys/"):
                data = self._read_key(device, req.path)
                if data is None:
                    raise FileNotFoundError(req.path)
                total, chunk = len(data), data[req.offset:req.offset + min(req.length, self.max_chunk)]
            else:
                total, chunk = self._read_file(req.path, req.offset, min(req.length, self.max_chunk))
        except FileNotFoundError:
            self.counters["not_found"] += 1
            return RepoReply(req.id, "not_found", req.offset, 0,
                             message=f"{req.path} is not in the repository")
        except RepoProtocolError as exc:
            self.counters["refused"] += 1
            log.warning("refused repository path", extra={"device": device, "path": req.path[:120]})
            return RepoReply(req.id, "error", req.offset, 0, message=exc.message)
        except OSError as exc:
            self.counters["errors"] += 1
            log.error("cannot read repository file", extra={"path": req.path[:120], "error": exc.strerror})
            return RepoReply(req.id, "error", req.offset, 0, message=f"cannot read {req.path}: server error")
        if req.offset > total:
            return RepoReply(req.id, "error", req.offset, total,
                             message=f"offset {req.offset} is past the end of {req.path} ({total} bytes)")
        self.counters["bytes"] += len(chunk)
        return RepoReply(req.id, "ok", req.offset, total, chunk)

    def _read_key(self, device: str, path: str) -> bytes | None:
        check_repo_path(path)
        if self.key_records is None:
            return None
        return self.key_records(device, path.partition("/")[2])

    def _resolve(self, path: str) -> Path:
        """The real file for ``path``, guaranteed inside ROOT/metadata or ROOT/targets."""
        kind, rest = check_repo_path(path)
        base = Path(os.path.realpath(self.root / kind))
        real = Path(os.path.realpath(base / rest))
        if os.path.commonpath([str(real), str(base)]) != str(base):
            raise RepoProtocolError(f"repository path {path[:80]!r} leads outside the repository; refused")
        return real

    def _read_file(self, path: str, offset: int, length: int) -> tuple[int, bytes]:
        real = self._resolve(path)
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(real, flags)
        except OSError as exc:
            if exc.errno in (2, 20):  # ENOENT, ENOTDIR
                raise FileNotFoundError(path) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(path)
            if offset >= st.st_size:
                return st.st_size, b""
            return st.st_size, os.pread(fd, length, offset)
        finally:
            os.close(fd)
