"""The Unix-socket fast path: binary frames (see uds_frames) served over a ServingPort.

Memory per connection is bounded (see uds_limits.UdsLimits): a frame over the cap is refused from
its header; at most ``max_pipelined`` frames wait; while the client leaves more than
``write_high_water`` bytes of replies unread the server stops reading from it (back-pressure), and
drops it after ``write_timeout_s``. Frames must arrive within ``read_timeout_s`` and idle
connections close after ``idle_timeout_s``. Across connections, large frames share a budget of
``max_buffered_bytes``: a large frame's body is read only once its size is reserved (FIFO).
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import time
from collections import deque
from pathlib import Path
from typing import Any

from edgert.errors import InputError, UnknownModelError
from edgert.metrics.timing import RequestTiming
from edgert.serve import eager, linger, memory, sockfile
from edgert.serve import uds_frames as fr
from edgert.serve.backpressure import NO_DEADLINE, WritePressure
from edgert.serve.oip_http import model_metadata_doc
from edgert.serve.port import ServingPort, error_text, status_for
from edgert.serve.uds_limits import BUDGET_MIN_FRAME, FrameBudget, UdsLimits, frame_cap_for
from edgert.serve.uds_streams import StreamHub

__all__ = ["UdsLimits", "UdsServer"]

log = logging.getLogger("edgert.serve.uds")

#: How often the deadline sweeper runs (s); deadlines are enforced to within this.
SWEEP_INTERVAL_S = 0.25
FRAME_CAP_HINT = (
    "the cap follows the served models' largest input; send smaller batches, "
    "or raise the daemon's socket max_frame_bytes"
)


class _Connection(WritePressure, asyncio.Protocol):
    """One client: reassemble frames, answer them in order, within the server's limits."""

    def __init__(self, server: UdsServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.chunks: deque[bytes] = deque()
        self.offset = 0  # bytes of chunks[0] already consumed
        self.buffered = 0  # unconsumed bytes in chunks
        self.need: int | None = None  # header+body length of the frame being received
        self.kind = 0
        self.meta_len = 0
        self.pending: deque[tuple[int, int, bytes]] = deque()
        self.busy = False
        self.write_paused = False
        self.reading_paused = False
        self.held_large = False  # held >= TRIM_AFTER_BYTES at some point: trim the heap at close
        self.waiting_budget = False  # a large frame's header arrived; its body waits for the budget
        self.reserved = 0  # budget bytes held by this connection's large frames
        self.inflight = 0  # size of the frame whose answer is being computed in a task
        self.deadline = time.monotonic() + self.limits.idle_timeout_s
        self.write_deadline = NO_DEADLINE

    # ---- asyncio callbacks -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.linger = linger.for_loop()
        if len(self.server.connections) >= self.limits.max_connections:
            self._close_with(503, f"too many connections (limit {self.limits.max_connections}); retry later")
            return
        self.transport.set_write_buffer_limits(high=self.limits.write_high_water)  # type: ignore[union-attr]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.pending.clear()
        self.chunks.clear()
        self.buffered = 0
        self.server.forget(self, self.reserved)
        self.reserved = 0
        self.waiting_budget = False
        if self.held_large:
            memory.request_trim()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        if self.buffered == 0 and self.need is None:
            self.deadline = time.monotonic() + self.limits.read_timeout_s  # a frame starts
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered >= memory.TRIM_AFTER_BYTES:
            self.held_large = True
        self._parse()

    # ---- framing -----------------------------------------------------------------------------
    def _hold(self) -> bool:
        """True while no more frames may be taken: replies are piling up or enough are queued."""
        return self.write_paused or self.waiting_budget or len(self.pending) >= self.limits.max_pipelined

    def _resume_input(self) -> None:
        """After a write pause: parse what arrived meanwhile (and read again)."""
        self._parse()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._hold():
            if not self.reading_paused:
                transport.pause_reading()
                self.reading_paused = True
        elif self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    def _parse(self) -> None:
        """Take every complete frame from the buffer (unless held) and dispatch them in order."""
        while self.transport is not None and not self._hold():
            if self.need is None:
                if self.buffered < fr.HEADER.size:
                    break
                head = self._take(fr.HEADER.size, peek=True)
                declared = fr.HEADER.unpack_from(head)[0]
                cap = self.server.frame_cap(declared)
                try:
                    body_len, self.kind, self.meta_len = fr.parse_header(head, cap)
                except fr.FrameError as exc:
                    self._fail(fr.FrameError(exc.message, hint=FRAME_CAP_HINT) if declared > cap else exc)
                    return
                self.need = fr.HEADER.size + body_len
                if self.need >= BUDGET_MIN_FRAME:
                    if not self.server.budget.reserve(self, self.need):
                        self.waiting_budget = True  # granted() carries on
                        break
                    self.reserved += self.need
            if self.buffered < self.need:
                break
            frame = self._take(self.need)
            self.need = None
            if self.kind == fr.STREAM_OPEN:  # the connection becomes a stream (serve/uds_streams.py)
                self._stream(frame)
                return
            self.deadline = time.monotonic() + (
                self.limits.read_timeout_s if self.buffered else self.limits.idle_timeout_s
            )
            self.pending.append((self.kind, self.meta_len, frame))
            if not self.busy:
                self._next()
        self._update_reading()

    def _stream(self, frame: bytes) -> None:
        """Hand this connection over to a stream session (opened on a connection with nothing in flight)."""
        self._answered(len(frame))
        transport = self.transport
        if self.busy or self.pending or transport is None:
            self._fail(InputError("open a stream on a connection with no requests in flight"))
            return
        rest = self._take(self.buffered) if self.buffered else b""
        self.transport = None
        self.server.connections.discard(self)
        if self.reading_paused:
            transport.resume_reading()
        self.server.streams.take_over(transport, self.meta_len, frame, rest)

    def granted(self) -> None:
        """The budget now holds this connection's large frame: read its body."""
        self.waiting_budget = False
        if self.transport is None or self.need is None:  # gone meanwhile: give the share back
            self.server.release(self.need or 0)
            return
        self.reserved += self.need
        self.deadline = time.monotonic() + self.limits.read_timeout_s
        self._parse()

    def _answered(self, size: int) -> None:
        """A frame of ``size`` bytes was answered: return its budget share."""
        if size >= BUDGET_MIN_FRAME and self.reserved >= size:
            self.reserved -= size
            self.server.release(size)

    def _take(self, n: int, peek: bool = False) -> bytes:
        """The first ``n`` buffered bytes, removed unless ``peek`` (no copy when a chunk is a frame)."""
        first = self.chunks[0]
        if self.offset == 0 and len(first) == n:
            if not peek:
                self.chunks.popleft()
                self.buffered -= n
            return first
        parts = []
        left, used, off = n, 0, self.offset
        while left:
            chunk = self.chunks[used]
            avail = len(chunk) - off
            if avail <= left:
                parts.append(chunk[off:] if off else chunk)
                left -= avail
                used += 1
                off = 0
            else:
                parts.append(chunk[off : off + left])
                off += left
                left = 0
        if not peek:
            for _ in range(used):
                self.chunks.popleft()
            self.offset = off
            self.buffered -= n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fail(self, exc: Exception) -> None:
        """Framing is broken: answer once and close, since the stream cannot resynchronise."""
        self._close_with(400, error_text(exc))

    def _close_with(self, status: int, message: str) -> None:
        """Send one ERROR frame, then close (after it is flushed) and drop everything buffered."""
        self.pending.clear()
        self.chunks.clear()
        self.buffered = 0
        transport = self.transport
        if transport is not None:
            transport.writelines(fr.encode_frame(fr.ERROR, {"error": message, "status": status}))
            transport.close()
            self.transport = None
            self.server.connections.discard(self)

    # ---- dispatch ----------------------------------------------------------------------------
    def _next(self) -> None:
        while self.pending and self.transport is not None and not self.write_paused:
            kind, meta_len, frame = self.pending.popleft()
            if len(frame) >= memory.TRIM_AFTER_BYTES:
                memory.request_trim()  # runs later, off the loop, once this frame is freed
            # Eager: a request to an inline model completes right here, with no task per request.
            started = eager.start(self.server.handle(kind, meta_len, frame))
            if isinstance(started, eager.Done):
                self._write(started.result())  # handle() never raises
                self._answered(len(frame))
                continue
            self.busy = True
            self.inflight = len(frame)
            started.add_done_callback(self._done)
            return

    def _done(self, task: asyncio.Future[list[Any]]) -> None:
        self.busy = False
        if task.cancelled():
            buffers = fr.encode_frame(fr.ERROR, {"error": "server is shutting down", "status": 503})
        else:
            buffers = task.result()
        self._write(buffers)
        self._answered(self.inflight)
        self._next()
        self._parse()

    def _write(self, buffers: list[Any]) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.output_over_cap(transport, "replies"):
            return
        transport.writelines(buffers)
        self.linger.touch()
        if not self.buffered and self.need is None:
            self.deadline = time.monotonic() + self.limits.idle_timeout_s

    def _drop(self, reason: str) -> None:
        """Abort: free our buffers now (a client that does not read would never let close() finish)."""
        log.warning("dropping socket client", extra={"reason": reason})
        transport = self.transport
        self.held_large = True
        if transport is not None:
            self.transport = None
            self.server.connections.discard(self)
            transport.abort()

    def check_deadline(self, now: float) -> None:
        """Close a connection past its read, idle or write deadline."""
        if self.transport is None:
            return
        if self.write_paused:
            if now >= self.write_deadline:
                self._drop(f"client read no reply for {self.limits.write_timeout_s:g} s")
            return
        if now < self.deadline or self.busy or self.pending or self.waiting_budget:
            return  # waiting for the budget is the server's doing, not the client's
        if self.buffered or self.need is not None:
            self._close_with(408, f"frame not received within {self.limits.read_timeout_s:g} s")
        else:
            self.transport.close()
            self.transport = None
            self.server.connections.discard(self)


class UdsServer:
    """Serve the binary protocol on a Unix socket with configured mode, owner, group and limits."""

    def __init__(
        self,
        backend: ServingPort,
        limits: UdsLimits | None = None,
        *,
        max_frame_bytes: int | None = None,
    ) -> None:
        if max_frame_bytes is not None:  # the older keyword: a fixed frame cap
            from dataclasses import replace

            limits = replace(limits or UdsLimits(), max_frame_bytes=max_frame_bytes)
        self.backend = backend
        self.limits = limits or UdsLimits()
        #: The frame cap in force (fixed, or sized from the served models).
        self.max_frame_bytes = self.limits.max_frame_bytes or 0
        self.budget = FrameBudget(max(self.limits.max_buffered_bytes, self.max_frame_bytes))
        self.connections: set[_Connection] = set()
        self.streams = StreamHub(self)  # connections turned into stream sessions
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._bound: sockfile.SocketFileId | None = None
        self.path: Path | None = None

    def frame_cap(self, body_len: int = 0) -> int:
        """The frame cap for a frame of ``body_len``: automatic caps are re-sized when it is larger.

        Re-sizing only on the rare oversized frame keeps the hot path to one comparison while
        following models loaded after start.
        """
        if self.limits.max_frame_bytes is None and body_len > self.max_frame_bytes:
            self._set_cap(self._auto_cap())
        return self.max_frame_bytes

    def _set_cap(self, cap: int) -> None:
        self.max_frame_bytes = cap
        self.budget.total = max(self.limits.max_buffered_bytes, cap)  # one frame at the cap always fits

    def release(self, size: int) -> None:
        """Return budget bytes and let the connections waiting for them read on."""
        for conn in self.budget.release(size):
            conn.granted()  # type: ignore[attr-defined]

    def forget(self, conn: _Connection, reserved: int) -> None:
        """A connection went away: drop its place in the queue and return its share."""
        granted = self.budget.cancel(conn) if conn.waiting_budget else []
        if reserved:
            granted += self.budget.release(reserved)
        for other in granted:
            other.granted()  # type: ignore[attr-defined]

    def _auto_cap(self) -> int:
        metas = []
        for name in self.backend.model_names():
            try:
                metas.append(self.backend.model_meta(name))
            except UnknownModelError:  # unloaded meanwhile
                continue
        return frame_cap_for(metas)

    async def start(
        self, path: str | os.PathLike[str], *, mode: int = 0o660, owner: str = "", group: str = ""
    ) -> None:
        """Bind ``path`` and listen: refuses a path a live server answers on, replaces a stale socket.

        Raises ConfigError ("another edgert daemon is serving on PATH ...") when the path is taken.
        """
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        sockfile.prepare_path(p)
        if self.limits.max_frame_bytes is None:
            self._set_cap(self._auto_cap())
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: _Connection(self), str(p), backlog=1024)
        self.path = p
        self._bound = sockfile.identify(p)
        os.chmod(p, mode)
        if owner or group:
            uid = pwd.getpwnam(owner).pw_uid if owner else -1
            gid = grp.getgrnam(group).gr_gid if group else -1
            os.chown(p, uid, gid)
        self._sweeper = loop.create_task(self._sweep())
        log.info("socket limits", extra={"path": str(p), "max_frame_bytes": self.max_frame_bytes})

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadline(now)

    async def stop(self) -> None:
        """Stop listening, close connections and remove the socket file if it is still ours."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self._server is None:
            return
        self._server.close()
        self.streams.stop()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        await self._server.wait_closed()
        self._server = None
        if self.path is not None:
            sockfile.remove_if_ours(self.path, self._bound)
            self._bound = None

    async def handle(self, kind: int, meta_len: int, frame: bytes) -> list[Any]:
        """Answer one frame; never raises (errors become ERROR frames)."""
        request_id = None
        timing = None
        received = time.monotonic_ns()
        try:
            meta, data = fr.decode_body(memoryview(frame)[fr.HEADER.size :], meta_len)
            request_id = meta.get("id") if isinstance(meta.get("id"), str) else None
            if kind == fr.INFER:
                tp = meta.get("tp")
                timing = self.backend.tracer.start("socket", tp if isinstance(tp, str) else None, received)
            return await self._dispatch(kind, meta, data, meta_len, request_id, timing)
        except Exception as exc:
            status = status_for(exc)
            trace_id = timing.trace_id if timing is not None else None
            if status >= 500 and not hasattr(exc, "retry_after"):
                log.error("socket request failed", exc_info=exc,
                          extra={"request_id": request_id, "trace_id": trace_id})
            doc: dict[str, Any] = {"error": error_text(exc), "status": status}
            if hasattr(exc, "retry_after"):
                doc["retry_after"] = exc.retry_after
            if request_id:
                doc["id"] = request_id
            if timing is not None:
                doc["tp"] = self.backend.tracer.reply_traceparent(timing)
                self.backend.tracer.finish(timing, status)
            return fr.encode_frame(fr.ERROR, doc)

    async def _dispatch(
        self,
        kind: int,
        meta: dict[str, Any],
        data: memoryview,
        meta_len: int,
        request_id: str | None,
        timing: RequestTiming | None = None,
    ) -> list[Any]:
        b = self.backend
        name = meta.get("m")
        version = meta.get("v")
        if isinstance(version, int) and not isinstance(version, bool):
            version = str(version)  # LOAD has always taken a number
        elif version is not None and not isinstance(version, str):
            raise InputError(f"'v' must be a version string like \"2\", got {type(version).__name__}")
        if kind == fr.INFER:
            if not isinstance(name, str):
                raise InputError("infer frame needs a model name in 'm'")
            outputs = meta.get("o")
            if outputs is not None and not (
                isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
            ):
                raise InputError("'o' must be a list of output names (strings), e.g. [\"logits\"]")
            t = timing or b.tracer.start("socket", None)
            t.model = name
            decode_start = time.monotonic_ns()
            inputs = fr.decode_tensors(meta, data, meta_len)
            t.decode_ns = time.monotonic_ns() - decode_start
            outcome = await b.infer(name, inputs, version=version, outputs=outputs, request_id=request_id,
                                    timing=t)
            t.version = t.version or outcome.model_version  # a cascade: the engine did not stamp it
            encode_start = time.monotonic_ns()
            doc: dict[str, Any] = {"m": outcome.model_name, "v": outcome.model_version,
                                   "tp": b.tracer.reply_traceparent(t)}
            cold = getattr(outcome, "cold_load_s", None)
            if cold:  # the model was loaded for this request (docs/memory.md)
                doc["cold_load_ms"] = round(cold * 1000, 3)
            if request_id:
                doc["id"] = request_id
            reply = fr.encode_frame(fr.OK, doc, outcome.outputs)
            t.encode_ns = time.monotonic_ns() - encode_start
            b.tracer.finish(t, 200)
            return reply
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
