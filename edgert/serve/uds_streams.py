"""Streams on the Unix socket: a STREAM_OPEN frame turns its connection into one stream session.

The request connection (serve/uds.py) hands its transport over here when a STREAM_OPEN arrives on
an otherwise idle connection. From then on the client sends PUSH frames (one tensor each, zero-copy
into numpy) and finally CLOSE; the server answers OK (the accepted stream), then RESULT frames in
push order, then END, and closes. A bad push gets a RESULT carrying ``error`` and the stream carries
on; only broken framing ends it with an ERROR frame.

Memory per stream is bounded: one frame being received (at most the frame cap), the session's queue
(one item under ``latest``), and about ``write_high_water`` of unsent results. Under ``all`` the
server stops reading while the queue is full (the sender is back-pressured through the socket);
under ``latest`` and ``drop-oldest`` it keeps reading and the policy drops, so a client that stops
reading costs no more memory. A client that reads nothing for ``write_timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from edgert.engine.streams import StreamEnd, StreamResult, StreamSession
from edgert.errors import EdgertError
from edgert.serve import uds_frames as fr
from edgert.serve.port import error_text, status_for
from edgert.serve.stream_wire import MAX_STREAMS, apply_frame, describe, end_frame, open_session, result_frame

if TYPE_CHECKING:
    from edgert.serve.uds import UdsServer

__all__ = ["StreamHub", "UdsStream"]

log = logging.getLogger("edgert.serve.uds")


class UdsStream(asyncio.Protocol):
    """One stream session on a socket connection taken over from the request protocol."""

    def __init__(self, hub: StreamHub, transport: asyncio.Transport) -> None:
        self.hub = hub
        self.limits = hub.server.limits
        self.transport: asyncio.Transport | None = transport
        self.buf = bytearray()
        self.session: StreamSession | None = None
        self.task: asyncio.Task[StreamEnd] | None = None
        self.reading_paused = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    # -- opening ------------------------------------------------------------------------------------
    def start(self, meta_len: int, frame: bytes, rest: bytes) -> None:
        """Answer the OPEN frame (``frame`` includes its header), then take ``rest`` as stream input."""
        try:
            if len(self.hub.streams) >= MAX_STREAMS:
                raise _Busy(f"too many streams open (limit {MAX_STREAMS}); retry later")
            meta, _ = fr.decode_body(memoryview(frame)[fr.HEADER.size :], meta_len)
            self.session = open_session(
                self.hub.server.backend,
                meta,
                self.hub.server.frame_cap(),
                self._emit,
                writable=self._writable,
                on_space=self._on_space,
            )
        except Exception as exc:
            self._fatal(status_for(exc) if not isinstance(exc, _Busy) else 503, error_text(exc))
            return
        self.hub.streams.add(self)
        self._write(fr.encode_frame(fr.OK, {"stream": describe(self.session)}))
        self.task = asyncio.ensure_future(self.session.run())
        self.task.add_done_callback(self._ended)
        if rest:
            self.data_received(rest)

    # -- asyncio callbacks --------------------------------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.buf = bytearray()
        self.can_write.set()  # let a waiting worker notice and stop
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.hub.streams.discard(self)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.buf:  # a frame straddles reads: join (one copy), else parse straight from ``data``
            self.buf += data
            view = memoryview(bytes(self.buf))
            self.buf = bytearray()
        else:
            view = memoryview(data)
        pos = 0
        while self.transport is not None and len(view) - pos >= fr.HEADER.size:
            try:
                body_len, kind, meta_len = fr.parse_header(view[pos:], self.hub.server.frame_cap())
            except fr.FrameError as exc:
                self._fatal(400, error_text(exc))
                return
            need = fr.HEADER.size + body_len
            if len(view) - pos < need:
                break
            self._frame(kind, meta_len, view[pos : pos + need])  # arrays are views into it
            pos += need
        if self.transport is not None and pos < len(view):
            self.buf += view[pos:]
        self._update_reading()

    # -- frames -------------------------------------------------------------------------------------
    def _frame(self, kind: int, meta_len: int, frame: memoryview) -> None:
        assert self.session is not None
        refused = apply_frame(self.session, kind, meta_len, frame)
        if refused is not None:
            self._write(refused)

    def _update_reading(self) -> None:
        transport, session = self.transport, self.session
        if transport is None or session is None:
            return
        if session.full() and not self.reading_paused:
            transport.pause_reading()  # back-pressure under "all": the sender blocks in send()
            self.reading_paused = True
        elif not session.full() and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    def _on_space(self) -> None:
        self._update_reading()

    async def _writable(self) -> None:
        if self.can_write.is_set():
            return
        try:
            await asyncio.wait_for(self.can_write.wait(), self.limits.write_timeout_s)
        except asyncio.TimeoutError:
            self._abort(f"stream client read no result for {self.limits.write_timeout_s:g} s")

    def _emit(self, result: StreamResult) -> None:
        self._write(result_frame(result))

    def _ended(self, task: asyncio.Task[StreamEnd]) -> None:
        if task.cancelled() or self.transport is None:
            return
        exc = task.exception()
        if exc is not None:
            log.error("stream failed", exc_info=exc)
            self._fatal(500, "internal error; see the daemon log")
            return
        self._write(end_frame(task.result()))
        self.close()

    # -- output -------------------------------------------------------------------------------------
    def _write(self, buffers: list[Any]) -> None:
        if self.transport is not None:
            self.transport.writelines(buffers)

    def _fatal(self, status: int, message: str) -> None:
        self._write(fr.encode_frame(fr.ERROR, {"error": message, "status": status}))
        self.close()

    def close(self) -> None:
        """End the stream: flush what was written, then close the connection."""
        transport, self.transport = self.transport, None
        self.hub.streams.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if transport is not None:
            transport.close()

    def _abort(self, reason: str) -> None:
        log.warning("dropping stream client", extra={"reason": reason})
        transport, self.transport = self.transport, None
        self.hub.streams.discard(self)
        if transport is not None:
            transport.abort()


class _Busy(EdgertError):
    """Too many streams."""


class StreamHub:
    """The socket server's open streams: take over connections, close them all at stop."""

    def __init__(self, server: UdsServer) -> None:
        self.server = server
        self.streams: set[UdsStream] = set()

    def take_over(self, transport: asyncio.Transport, meta_len: int, frame: bytes, rest: bytes) -> None:
        """Make ``transport`` (whose OPEN frame is ``frame``, followed by ``rest``) a stream."""
        stream = UdsStream(self, transport)
        transport.set_protocol(stream)
        stream.start(meta_len, frame, rest)

    def stop(self) -> None:
        """Close every stream (server shutdown)."""
        for stream in list(self.streams):
            stream.close()
