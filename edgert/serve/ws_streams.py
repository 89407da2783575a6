"""Streams over WebSocket (RFC 6455, sans-I/O ``wsproto``): ``/v2/models/{m}[/versions/{v}]/stream``.

The HTTP server hands an Upgrade request to :meth:`OipRouter.upgrade`, which authenticates it like
every other route and passes the connection here. The first message is a JSON text
``{"type": "open", "opts": {...}}``; pushes are binary stream frames (the socket's PUSH framing,
docs/streams.md) or JSON text ``{"type": "push", "id", "ts", "data": [...]}``; ``{"type":
"close"}`` ends the stream once the queued items are answered. Results are binary RESULT frames,
or JSON text with ``"results": "json"`` at open. Broken framing (an unmasked client frame, a
fragmented control frame) closes with 1002, a message over :data:`MAX_MESSAGE_BYTES` with 1009.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import RemoteProtocolError

from edgert.engine.streams import StreamEnd, StreamResult, StreamSession
from edgert.errors import EdgertError, InputError
from edgert.serve import uds_frames as fr
from edgert.serve.http_server import Request as HttpRequest
from edgert.serve.oip_codec import datatype_of, json_dumps, json_loads
from edgert.serve.port import ServingPort, error_text, status_for
from edgert.serve.stream_wire import MAX_STREAMS, apply_frame, describe, end_frame, item_error, open_session

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SUBPROTOCOL",
    "WRITE_TIMEOUT_S",
    "WsStream",
    "offered_bearer",
    "raw_request",
    "stream_route",
]

log = logging.getLogger("edgert.serve.ws")

#: Largest WebSocket message (and assembled window) accepted; larger ones close with 1009.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
#: The subprotocol the server selects; browsers, which cannot set headers, offer it together with
#: ``edgert.bearer.<token>`` to authenticate.
SUBPROTOCOL = "edgert"
#: A client that reads no result for this long is dropped (as HttpLimits.write_timeout_s).
WRITE_TIMEOUT_S = 30.0
BEARER_PREFIX = "edgert.bearer."

_open: set[WsStream] = set()


def stream_route(path: str) -> tuple[str, str | None] | None:
    """(model, version) of a stream path, or None when ``path`` is not one."""
    from urllib.parse import unquote

    parts = [unquote(p) for p in path.strip("/").split("/")]
    if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "stream":
        return parts[2], None
    if len(parts) == 6 and parts[:2] == ["v2", "models"] and parts[3] == "versions" and parts[5] == "stream":
        return parts[2], parts[4]
    return None


def offered_bearer(req: HttpRequest) -> bytes | None:
    """``Bearer <token>`` from an offered ``edgert.bearer.<token>`` subprotocol, if any."""
    for proto in req.headers.get("sec-websocket-protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(BEARER_PREFIX):
            return b"Bearer " + proto[len(BEARER_PREFIX) :].encode("latin-1")
    return None


def raw_request(req: HttpRequest) -> bytes:
    """The request head again, for wsproto's handshake (httptools already parsed it)."""
    target = req.path + ("?" + req.query if req.query else "")
    lines = [f"{req.method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in req.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class WsStream(asyncio.Protocol):
    """One WebSocket stream session on a connection taken over from the HTTP server."""

    def __init__(self, backend: ServingPort, model: str, version: str | None) -> None:
        self.backend, self.model, self.version = backend, model, version
        self.ws = WSConnection(ConnectionType.SERVER)
        self.transport: asyncio.Transport | None = None
        self.session: StreamSession | None = None
        self.task: asyncio.Task[StreamEnd] | None = None
        self.json_results = False
        self.message: list[Any] = []  # the parts of a message being received
        self.message_bytes = 0
        self.reading_paused = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def take_over(self, transport: asyncio.Transport, head: bytes, rest: bytes) -> None:
        """Run on ``transport`` from now on; ``head`` is the upgrade request, ``rest`` what followed."""
        self.transport = transport
        transport.set_protocol(self)
        _open.add(self)
        self.data_received(head + rest)

    # -- asyncio callbacks ----------------------------------------------------------------------------
    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.message = []
        self.can_write.set()
        _open.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        try:
            self.ws.receive_data(data)
        except RemoteProtocolError as exc:  # a bad handshake
            self._send(exc.event_hint or RejectConnection(status_code=400))
            self._close()
            return
        for event in self.ws.events():
            if self.transport is None:
                return
            self._event(event)
        self._update_reading()

    # -- events ---------------------------------------------------------------------------------------
    def _event(self, event: Any) -> None:
        if isinstance(event, Request):
            if len(_open) > MAX_STREAMS:
                self._send(RejectConnection(status_code=503))
                self._close()
                return
            sub = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
            self._send(AcceptConnection(subprotocol=sub))
        elif isinstance(event, (TextMessage, BytesMessage)):
            self.message_bytes += len(event.data)
            if self.message_bytes > MAX_MESSAGE_BYTES:
                self._goodbye(CloseReason.MESSAGE_TOO_BIG, f"message over {MAX_MESSAGE_BYTES} bytes")
                return
            self.message.append(event.data)
            if event.message_finished:
                parts, self.message, self.message_bytes = self.message, [], 0
                if isinstance(event, TextMessage):
                    self._text("".join(parts))
                else:
                    self._binary(b"".join(parts))
        elif isinstance(event, Ping):
            self._send(event.response())
        elif isinstance(event, CloseConnection):
            # a client close, or wsproto's verdict on broken framing (1002) and the like
            if self.ws.state is ConnectionState.REMOTE_CLOSING:
                self._send(event.response())
            elif self.ws.state is ConnectionState.OPEN:  # wsproto's verdict: tell the client why
                self._send(CloseConnection(code=event.code, reason=(event.reason or "")[:100]))
            self._close()

    def _text(self, text: str) -> None:
        try:
            doc = json_loads(text)
            if not isinstance(doc, dict):
                raise InputError('a text message must be a JSON object with a "type"')
            kind = doc.get("type")
            if self.session is None:
                if kind != "open":
                    raise InputError('the first message must be {"type": "open", "opts": {...}}')
                self._open(doc)
                return
            if kind == "push":
                self._push_json(doc)
            elif kind == "close":
                self.session.close()
            else:
                raise InputError(f'unknown message type {kind!r}; send "push" or "close"')
        except ValueError as exc:
            self._refused(None, InputError(f"text message is not valid JSON: {exc}"))
        except EdgertError as exc:
            if self.session is None:
                self._fatal(exc)
            else:
                self._refused(doc.get("id") if isinstance(doc, dict) else None, exc)

    def _binary(self, data: bytes) -> None:
        if self.session is None:
            self._fatal(InputError('open the stream first: {"type": "open", "opts": {...}} as text'))
            return
        try:
            body_len, kind, meta_len = fr.parse_header(data, MAX_MESSAGE_BYTES)
            if fr.HEADER.size + body_len != len(data):
                raise fr.FrameError("a binary message must hold exactly one stream frame")
        except fr.FrameError as exc:
            self._refused(None, exc)
            return
        refused = apply_frame(self.session, kind, meta_len, memoryview(data))
        if refused is not None:
            self._send_bytes(b"".join(bytes(b) for b in refused))

    def _open(self, doc: dict[str, Any]) -> None:
        self.json_results = doc.get("results") == "json"
        open_doc = {"m": self.model, "v": doc.get("v", self.version), "opts": doc.get("opts", {})}
        self.session = open_session(
            self.backend,
            open_doc,
            MAX_MESSAGE_BYTES,
            self._emit,
            writable=self._writable,
            on_space=self._update_reading,
        )
        self._send_text({"type": "opened", "stream": describe(self.session)})
        self.task = asyncio.ensure_future(self.session.run())
        self.task.add_done_callback(self._ended)

    def _push_json(self, doc: dict[str, Any]) -> None:
        session = self.session
        assert session is not None
        plan = session.plan
        shape = doc.get("shape", [-1 if d is None else d for d in plan.item_shape])
        try:
            array = np.asarray(doc.get("data"), dtype=plan.dtype).reshape(shape)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f'"data" does not fit {datatype_of(plan.dtype)} with shape {shape}: {exc}'
            ) from None
        session.push(doc.get("id"), doc.get("ts"), {plan.input: array})

    # -- results ---------------------------------------------------------------------------------------
    def _emit(self, result: StreamResult) -> None:
        if not self.json_results:
            self._send_bytes(
                b"".join(
                    bytes(b) for b in fr.encode_frame(fr.STREAM_RESULT, result.meta(), result.outputs or None)
                )
            )
            return
        doc = {"type": "result", **result.meta()}
        if result.outputs:
            doc["outputs"] = {
                k: {"datatype": datatype_of(v.dtype), "shape": list(v.shape), "data": v.reshape(-1).tolist()}
                for k, v in result.outputs.items()
            }
        self._send_text(doc)

    def _ended(self, task: asyncio.Task[StreamEnd]) -> None:
        if task.cancelled() or self.transport is None:
            return
        exc = task.exception()
        if exc is not None:
            log.error("stream failed", exc_info=exc)
            self._goodbye(CloseReason.INTERNAL_ERROR, "internal error; see the daemon log")
            return
        end = task.result()
        if self.json_results:
            self._send_text({"type": "end", **end.meta()})
        else:
            self._send_bytes(b"".join(bytes(b) for b in end_frame(end)))
        self._goodbye(CloseReason.NORMAL_CLOSURE, end.reason)

    async def _writable(self) -> None:
        if self.can_write.is_set():
            return
        try:
            await asyncio.wait_for(self.can_write.wait(), WRITE_TIMEOUT_S)
        except asyncio.TimeoutError:
            log.warning(
                "dropping stream client", extra={"reason": f"read no result for {WRITE_TIMEOUT_S:g} s"}
            )
            transport, self.transport = self.transport, None
            _open.discard(self)
            if transport is not None:
                transport.abort()

    def _update_reading(self) -> None:
        transport, session = self.transport, self.session
        if transport is None or session is None:
            return
        if session.full() and not self.reading_paused:
            transport.pause_reading()  # back-pressure under "all"
            self.reading_paused = True
        elif not session.full() and self.reading_paused:
            transport.resume_reading()
            self.reading_paused = False

    # -- output ----------------------------------------------------------------------------------------
    def _refused(self, item_id: Any, exc: EdgertError) -> None:
        if self.json_results or self.session is None:
            self._send_text(
                {"type": "result", "id": item_id, "error": error_text(exc), "status": status_for(exc)}
            )
        else:
            self._send_bytes(
                b"".join(bytes(b) for b in item_error(item_id, error_text(exc), status_for(exc)))
            )

    def _fatal(self, exc: BaseException) -> None:
        self._send_text({"type": "error", "error": error_text(exc), "status": status_for(exc)})
        self._goodbye(CloseReason.POLICY_VIOLATION, "stream refused")

    def _goodbye(self, code: int, reason: str) -> None:
        if self.ws.state is ConnectionState.OPEN:
            self._send(CloseConnection(code=code, reason=reason[:100]))
        self._close()

    def _send_text(self, doc: dict[str, Any]) -> None:
        self._send(TextMessage(data=json_dumps(doc).decode()))

    def _send_bytes(self, data: bytes) -> None:
        self._send(BytesMessage(data=data))

    def _send(self, event: Any) -> None:
        if self.transport is None:
            return
        try:
            self.transport.write(self.ws.send(event))
        except Exception:  # wsproto refuses events in the wrong state: the connection is ending
            log.debug("websocket event not sent", exc_info=True)

    def _close(self) -> None:
        transport, self.transport = self.transport, None
        _open.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if transport is not None:
            transport.close()
