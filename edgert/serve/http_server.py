"""A small HTTP/1.1 server: asyncio protocol + httptools (llhttp) parsing, with hard limits.

Chosen by measurement over uvicorn (see docs/serving.md): with no ASGI layer between the parser and
the handler, a request costs tens of microseconds instead of hundreds. Limits are enforced while
bytes arrive: header bytes, declared and actual body size, a per-request read deadline (slowloris),
an idle keep-alive deadline and a connection cap. Requests on one connection are answered in order.

Back-pressure: while a client leaves more than ``write_high_water`` bytes of responses unread, the
server stops reading from it and parses no further requests (what was read but not parsed waits as
raw bytes), so a client pipelining without reading costs a bounded amount of memory; one that reads
nothing for ``write_timeout_s`` is dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

from edgert.serve import eager, linger, memory
from edgert.serve.backpressure import NO_DEADLINE, WritePressure

__all__ = ["HttpLimits", "HttpServer", "Request", "Response"]

log = logging.getLogger("edgert.serve.http")

#: How often the deadline sweeper runs (s); deadlines are enforced to within this.
SWEEP_INTERVAL_S = 0.25
#: Pipelined requests buffered per connection before we stop reading from it.
MAX_PIPELINED = 16
#: Received bytes are parsed in slices of this size, so parsing can stop between requests once the
#: connection is held (without it, one 256 KiB read of tiny pipelined requests parses thousands).
FEED_SLICE_BYTES = 16 * 1024

_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    415: b"Unsupported Media Type",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}


@dataclass(frozen=True)
class HttpLimits:
    """Per-server limits (see edgert.config.HttpConfig)."""

    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    read_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    #: A client that reads none of its responses for this long is dropped.
    write_timeout_s: float = 30.0
    #: Unsent response bytes per connection above which the server stops reading from it.
    write_high_water: int = 256 * 1024
    #: A client leaving more than this of earlier responses unread is disconnected (a backstop).
    max_output_bytes: int = 16 * 1024 * 1024


@dataclass
class Request:
    """One parsed request. Header names are lower-case."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    #: time.monotonic_ns() when the request was fully read (0: unknown), for its timing record.
    received_ns: int = 0


@dataclass
class Response:
    """A response; ``body`` may be several chunks written back to back."""

    status: int = 200
    body: list[bytes | memoryview] = field(default_factory=list)
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Handler = Callable[[Request], "Response | Awaitable[Response]"]


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    """A JSON ``{"error": ...}`` response."""
    from edgert.serve.oip_codec import json_dumps

    return Response(status, [json_dumps({"error": message})], headers=headers or [])


def _serialize_head(resp: Response, keep_alive: bool, length: int) -> bytes:
    reason = _REASONS.get(resp.status, b"Status")
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (resp.status, reason),
        b"content-type: %s\r\ncontent-length: %d\r\n" % (resp.content_type.encode(), length),
    ]
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    for name, value in resp.headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    lines.append(b"\r\n")
    return b"".join(lines)


class _Connection(WritePressure, asyncio.Protocol):
    """One client connection: parse, enforce limits, dispatch in order."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        # The parser holds this protocol: connection_lost drops it so that the pair (and the last
        # request's buffers) is freed at once, not at the next full garbage collection.
        self.parser: httptools.HttpRequestParser | None = httptools.HttpRequestParser(self)
        self.pending: deque[tuple[Request, bool]] = deque()
        self.busy = False
        self.reading_paused = False
        self.write_paused = False
        self.write_deadline = NO_DEADLINE
        self.backlog = memoryview(b"")  # read but not yet parsed (the connection is held)
        self.feeding = False
        self.held_large = False  # held >= TRIM_AFTER_BYTES at some point: trim the heap at close
        self._reset()
        self.deadline = time.monotonic() + self.limits.keepalive_timeout_s
        self.in_request = False
        self.upgrade_request: Request | None = None  # an Upgrade request waiting for _upgrade

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_bytes = 0
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.rejected = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        self.linger = linger.for_loop()
        if len(self.server.connections) >= self.limits.max_connections:
            self._reject(503, "too many connections; retry later")
            return
        self.transport.set_write_buffer_limits(high=self.limits.write_high_water)  # type: ignore[union-attr]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        self.pending.clear()
        self.backlog = memoryview(b"")
        self.parser = None
        self._reset()
        if self.held_large:
            memory.request_trim()

    def data_received(self, data: bytes) -> None:
        if self.rejected:
            return
        if self.backlog:  # only if a read raced our pause: keep the order
            self.backlog = memoryview(bytes(self.backlog) + data)
            return
        self._feed(memoryview(data))

    def _hold(self) -> bool:
        """True while no more requests may be parsed: responses pile up or enough are queued."""
        return self.write_paused or len(self.pending) >= MAX_PIPELINED

    def _feed(self, data: memoryview) -> None:
        """Parse ``data`` slice by slice; once held, keep the rest in the backlog and stop reading."""
        parser = self.parser
        if parser is None:
            return
        self.feeding = True
        try:
            pos, size = 0, len(data)
            while pos < size and not self.rejected:
                if self._hold():
                    self.backlog = data[pos:]
                    break
                piece = data[pos : pos + FEED_SLICE_BYTES] if size - pos > FEED_SLICE_BYTES else data[pos:]
                pos += len(piece)
                parser.feed_data(piece)
        except httptools.HttpParserUpgrade as exc:  # WebSocket streams: the handler may take over
            self._upgrade(data[pos - len(piece) + int(exc.args[0]) :] if exc.args else memoryview(b""))
        except httptools.HttpParserError as exc:
            if not self.rejected:
                self._reject(400, f"malformed HTTP request: {exc}")
        finally:
            self.feeding = False
        self._update_reading()

    def _upgrade(self, rest: memoryview) -> None:
        """An Upgrade request: a handler with ``upgrade(request, transport, rest)`` may take the
        connection (it returns None) or answer it (a Response); otherwise it is refused."""
        request, self.upgrade_request = self.upgrade_request, None
        upgrade = getattr(self.server.handler, "upgrade", None)
        transport = self.transport
        if upgrade is None or request is None or transport is None or self.busy or self.pending:
            self._reject(400, "protocol upgrades are not supported here")
            return
        answer = upgrade(request, transport, bytes(rest))
        if answer is not None:
            self._reject(answer.status, "", answer)
            return
        self.transport = None  # taken over: no longer an HTTP connection
        self.parser = None
        self.server.connections.discard(self)
        self.server.upgraded.add(transport)  # closed by stop()

    def _resume_input(self) -> None:
        """After a write pause: read again."""
        self._update_reading()

    def _update_reading(self) -> None:
        """Pause or resume the transport to match _hold(); parse the backlog first when released."""
        transport = self.transport
        if transport is None or self.feeding or self.rejected:
            return
        if self._hold():
            if not self.reading_paused:
                transport.pause_reading()
                self.reading_paused = True
        elif self.backlog:
            data, self.backlog = self.backlog, memoryview(b"")
            self._feed(data)  # ends with _update_reading again
        elif self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self.in_request = True
        self.deadline = time.monotonic() + self.limits.read_timeout_s

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.header_bytes += len(url)
        self._check_header_size()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value) + 4
        self._check_header_size()
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]},{text}" if key in self.headers else text

    def _check_header_size(self) -> None:
        if self.header_bytes > self.limits.max_header_bytes and not self.rejected:
            self._reject(431, f"request headers exceed {self.limits.max_header_bytes} bytes")
            raise httptools.HttpParserError("header limit")

    def on_headers_complete(self) -> None:
        declared = self.headers.get("content-length")
        # Refuse on the declared size, before a single body byte is buffered.
        if (
            declared is not None
            and declared.isascii()
            and declared.isdigit()
            and (len(declared) > 19 or int(declared) > self.limits.max_body_bytes)
        ):
            self._reject(
                413, f"request body of {declared} bytes exceeds the {self.limits.max_body_bytes}-byte limit"
            )
            raise httptools.HttpParserError("body limit")

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)
        if self.body_bytes >= memory.TRIM_AFTER_BYTES:
            self.held_large = True
        if self.body_bytes > self.limits.max_body_bytes:
            self._reject(413, f"request body exceeds the {self.limits.max_body_bytes}-byte limit")
            raise httptools.HttpParserError("body limit")
        self.body.append(body)

    def on_message_complete(self) -> None:
        path, _, query = self.url.decode("latin-1").partition("?")
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        self.body = []  # the chunks are joined: free them now, not at the next request
        parser = self.parser
        assert parser is not None  # only called from inside parser.feed_data
        request = Request(parser.get_method().decode(), path, query, self.headers, body, time.monotonic_ns())
        keep_alive = parser.should_keep_alive()
        self.in_request = False
        if parser.should_upgrade():  # answered by _upgrade, not queued
            self.upgrade_request = request
            return
        self.deadline = time.monotonic() + self.limits.keepalive_timeout_s
        self.pending.append((request, keep_alive))
        if not self.busy:
            self._next()

    # dispatch
    def _next(self) -> None:
        while self.pending and self.transport is not None and not self.write_paused:
            request, keep_alive = self.pending.popleft()
            head_only = request.method == "HEAD"
            if len(request.body) >= memory.TRIM_AFTER_BYTES:
                memory.request_trim()  # runs later, off the loop, once this body is freed
            try:
                result = self.server.handler(request)
            except Exception:
                log.exception("handler failed", extra={"path": request.path})
                result = error_response(500, "internal error; see the daemon log")
            if isinstance(result, Response):
                self._write(result, keep_alive, head_only)
                continue
            if asyncio.iscoroutine(result):
                # Eager: an inference on an inline model finishes here, with no task per request.
                started = eager.start(result)
                if isinstance(started, eager.Done):
                    self._write(self._outcome(started.error, started.value, request), keep_alive, head_only)
                    continue
                task: asyncio.Future[Response] = started
            else:
                task = asyncio.ensure_future(result)
            self.busy = True
            task.add_done_callback(functools.partial(self._done, keep_alive=keep_alive, head_only=head_only))
            return
        self._update_reading()

    @staticmethod
    def _outcome(error: BaseException | None, value: Response | None, request: Request | None) -> Response:
        if isinstance(error, asyncio.CancelledError):
            return error_response(503, "server is shutting down")
        if error is not None or value is None:
            log.error("handler failed", exc_info=error, extra={"path": request.path if request else None})
            return error_response(500, "internal error; see the daemon log")
        return value

    def _done(self, task: asyncio.Future[Response], keep_alive: bool, head_only: bool = False) -> None:
        self.busy = False
        if task.cancelled():
            resp = error_response(503, "server is shutting down")
        else:
            resp = self._outcome(task.exception(), None if task.exception() else task.result(), None)
        if self.transport is None:
            return  # the client went away mid-request; the result is dropped
        self._write(resp, keep_alive, head_only)
        self._next()

    def _write(self, resp: Response, keep_alive: bool, head_only: bool = False) -> None:
        transport = self.transport
        if transport is None:
            return
        if self.output_over_cap(transport, "responses"):
            return
        length = sum(len(c) if isinstance(c, bytes) else c.nbytes for c in resp.body)
        head = _serialize_head(resp, keep_alive, length)
        if head_only:  # HEAD: the headers a GET would get, and no body (RFC 9110 9.3.2)
            transport.write(head)
        elif len(resp.body) == 1 and length < 65536:
            transport.write(head + resp.body[0])
        else:
            transport.writelines([head, *resp.body])
        self.linger.touch()
        if not keep_alive:
            transport.close()
            self.transport = None
            self.server.connections.discard(self)

    def _drop(self, reason: str) -> None:
        """Abort: free our buffers now (a client that does not read would never let close() finish)."""
        log.warning("dropping HTTP client", extra={"reason": reason})
        transport = self.transport
        self.held_large = True
        self.pending.clear()
        self.backlog = memoryview(b"")
        if transport is not None:
            self.transport = None
            self.server.connections.discard(self)
            transport.abort()

    def _reject(self, status: int, message: str, response: Response | None = None) -> None:
        """Answer with an error and close: the stream can no longer be trusted to be in sync."""
        self.rejected = True
        self.pending.clear()
        if self.transport is not None:
            self._write(response or error_response(status, message), keep_alive=False)

    def check_deadline(self, now: float) -> None:
        """Close connections whose request, idle or write deadline has passed."""
        if self.write_paused:
            if now >= self.write_deadline and self.transport is not None:
                self._drop(f"client read no response for {self.limits.write_timeout_s:g} s")
            return
        if now < self.deadline or self.busy or self.pending:
            return
        if self.in_request:
            self._reject(408, f"request not received within {self.limits.read_timeout_s:g} s")
        elif self.transport is not None:
            self.transport.close()
            self.transport = None
            self.server.connections.discard(self)


class HttpServer:
    """Serve ``handler`` on TCP; the handler returns a Response or an awaitable of one."""

    def __init__(self, handler: Handler, limits: HttpLimits | None = None) -> None:
        self.handler = handler
        self.limits = limits or HttpLimits()
        self.connections: set[_Connection] = set()
        #: Connections an upgrade handler took over (WebSocket streams), closed at stop.
        self.upgraded: weakref.WeakSet[Any] = weakref.WeakSet()
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, **kwargs: Any) -> tuple[str, int]:
        """Bind and listen; returns the bound (host, port) (port 0 picks a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True, backlog=1024, **kwargs
        )
        self._sweeper = loop.create_task(self._sweep())
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            now = time.monotonic()
            for conn in list(self.connections):
                conn.check_deadline(now)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass
            self._sweeper = None
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            self.connections.clear()
            for transport in list(self.upgraded):
                transport.close()
            await self._server.wait_closed()
            self._server = None
