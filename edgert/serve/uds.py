"""The Unix-socket fast path: binary frames (see uds_frames) served over a ServingPort."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import stat
from collections import deque
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, InputError
from edgert.serve import eager, linger
from edgert.serve import uds_frames as fr
from edgert.serve.oip_http import model_metadata_doc
from edgert.serve.port import ServingPort, error_text, status_for

__all__ = ["UdsServer"]

log = logging.getLogger("edgert.serve.uds")


class _Connection(asyncio.Protocol):
    """One client: reassemble frames, answer them in order."""

    def __init__(self, server: UdsServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.need: int | None = None  # body+header length of the frame being received
        self.kind = 0
        self.meta_len = 0
        self.pending: deque[tuple[int, int, bytes]] = deque()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.linger = linger.for_loop()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        while self.transport is not None:
            if self.need is None:
                if self.buffered < fr.HEADER.size:
                    return
                head = self._peek(fr.HEADER.size)
                try:
                    body_len, self.kind, self.meta_len = fr.parse_header(head, self.server.max_frame_bytes)
                except fr.FrameError as exc:
                    self._fail(exc)
                    return
                self.need = fr.HEADER.size + body_len
            if self.buffered < self.need:
                return
            frame = self._take(self.need)
            self.pending.append((self.kind, self.meta_len, frame))
            self.need = None
            if not self.busy:
                self._next()

    def _peek(self, n: int) -> bytes:
        if len(self.chunks[0]) >= n:
            return self.chunks[0][:n]
        joined = b"".join(self.chunks)
        self.chunks = [joined]
        return joined[:n]

    def _take(self, n: int) -> bytes:
        """Remove and return the first ``n`` buffered bytes (no copy when one chunk is one frame)."""
        joined = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        rest = joined[n:]
        self.chunks = [rest] if rest else []
        self.buffered = len(rest)
        return joined if len(joined) == n else joined[:n]

    def _fail(self, exc: Exception) -> None:
        """Framing is broken: answer once and close, since the stream cannot resynchronise."""
        self._write(fr.encode_frame(fr.ERROR, {"error": error_text(exc), "status": 400}))
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _next(self) -> None:
        while self.pending and self.transport is not None:
            kind, meta_len, frame = self.pending.popleft()
            # Eager: a request to an inline model completes right here, with no task per request.
            started = eager.start(self.server.handle(kind, meta_len, frame))
            if isinstance(started, eager.Done):
                self._write(started.result())  # handle() never raises
                continue
            self.busy = True
            started.add_done_callback(self._done)
            return

    def _done(self, task: asyncio.Future[list[Any]]) -> None:
        self.busy = False
        if task.cancelled():
            buffers = fr.encode_frame(fr.ERROR, {"error": "server is shutting down", "status": 503})
        else:
            buffers = task.result()
        self._write(buffers)
        self._next()

    def _write(self, buffers: list[Any]) -> None:
        if self.transport is not None:
            self.transport.writelines(buffers)
            self.linger.touch()


class UdsServer:
    """Serve the binary protocol on a Unix socket with configured mode, owner and group."""

    def __init__(self, backend: ServingPort, *, max_frame_bytes: int = 256 * 1024 * 1024) -> None:
        self.backend = backend
        self.max_frame_bytes = max_frame_bytes
        self.connections: set[_Connection] = set()
        self._server: asyncio.base_events.Server | None = None
        self.path: Path | None = None

    async def start(
        self, path: str | os.PathLike[str], *, mode: int = 0o660, owner: str = "", group: str = ""
    ) -> None:
        """Bind ``path`` (replacing a stale socket file, never another kind of file) and listen."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.exists() or p.is_symlink():
            if not stat.S_ISSOCK(p.lstat().st_mode):
                raise ConfigError(
                    f"socket path {p} exists and is not a socket", hint="choose another socket.path"
                )
            p.unlink()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(p), backlog=1024)
        self.path = p
        os.chmod(p, mode)
        if owner or group:
            uid = pwd.getpwnam(owner).pw_uid if owner else -1
            gid = grp.getgrnam(group).gr_gid if group else -1
            os.chown(p, uid, gid)

    async def stop(self) -> None:
        """Stop listening, close connections and remove the socket file."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self._server.wait_closed()
        self._server = None
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    async def handle(self, kind: int, meta_len: int, frame: bytes) -> list[Any]:
        """Answer one frame; never raises (errors become ERROR frames)."""
        request_id = None
        try:
            meta, data = fr.decode_body(memoryview(frame)[fr.HEADER.size :], meta_len)
            request_id = meta.get("id") if isinstance(meta.get("id"), str) else None
            return await self._dispatch(kind, meta, data, meta_len, request_id)
        except Exception as exc:
            status = status_for(exc)
            if status >= 500 and not hasattr(exc, "retry_after"):
                log.error("socket request failed", exc_info=exc, extra={"request_id": request_id})
            doc: dict[str, Any] = {"error": error_text(exc), "status": status}
            if hasattr(exc, "retry_after"):
                doc["retry_after"] = exc.retry_after
            if request_id:
                doc["id"] = request_id
            return fr.encode_frame(fr.ERROR, doc)

    async def _dispatch(
        self, kind: int, meta: dict[str, Any], data: memoryview, meta_len: int, request_id: str | None
    ) -> list[Any]:
        b = self.backend
        name = meta.get("m")
        version = meta.get("v")
        if kind == fr.INFER:
            if not isinstance(name, str):
                raise InputError("infer frame needs a model name in 'm'")
            inputs = fr.decode_tensors(meta, data, meta_len)
            outcome = await b.infer(
                name, inputs, version=version, outputs=meta.get("o"), request_id=request_id
            )
            doc: dict[str, Any] = {"m": outcome.model_name, "v": outcome.model_version}
            if request_id:
                doc["id"] = request_id
            return fr.encode_frame(fr.OK, doc, outcome.outputs)
        if kind == fr.META:
            return fr.encode_frame(fr.OK, model_metadata_doc(b.model_meta(str(name), version)))
        if kind == fr.READY:
            ready = b.model_meta(str(name), version).ready if name else b.ready()
            return fr.encode_frame(fr.OK, {"ready": ready, "live": b.live()})
        if kind == fr.STATUS:
            return fr.encode_frame(fr.OK, b.status())
        if kind == fr.LIST:
            return fr.encode_frame(fr.OK, {"models": b.model_names()})
        if kind == fr.LOAD:
            # "d": an explicit downgrade, sent only by `edgert models activate --allow-downgrade` and
            # `edgert models rollback` (the socket is the device's privileged control path; HTTP has none).
            downgrade = meta.get("d") is True
            await b.load(str(name), None if version is None else str(version), allow_downgrade=downgrade)
            return fr.encode_frame(fr.OK, {})
        if kind == fr.UNLOAD:
            await b.unload(str(name))
            return fr.encode_frame(fr.OK, {})
        raise InputError(f"frame kind {kind} is not a request")
