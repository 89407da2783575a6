"""Client side of streams over the Unix socket: one pure codec, a sync iterator and an async one.

    with Client("unix:///run/edgert/edgert.sock") as c:
        for r in c.stream("tones", chunks, window=16000, hop=1600):   # or: async for r in ...
            print(r.id, r.outputs["logits"], r.dropped, r.lag_ms)

Items are arrays (ids count from 0), ``(id, array)`` or ``(id, ts, array)`` pairs. A sender (thread
or task) pushes them while the caller iterates the results, so a blocking send under the ``all``
policy (back-pressure) never stops the results from being read.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.errors import InputError, ServeError
from edgert.serve import uds_frames as fr

__all__ = ["Stream", "StreamEnded", "StreamResult"]

#: Bytes read per recv while streaming.
STREAM_RECV_BYTES = 256 * 1024
#: Largest frame accepted from the daemon.
MAX_REPLY_BYTES = 1 << 31


@dataclass
class StreamResult:
    """One result of a stream: outputs (or error), item id and timestamp, drops before it, lag."""

    id: Any
    ts: Any = None
    seq: int = 0
    dropped: int = 0
    lag_ms: float = 0.0
    run_ms: float = 0.0
    queued: int = 0
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    error: str | None = None
    status: int = 0


@dataclass(frozen=True)
class StreamEnded:
    """How the stream ended: reason ("closed", "idle"), results sent and items dropped in all."""

    reason: str
    results: int
    dropped: int


class _Codec:
    """Pure framing of one stream (shared by the sync and async shells)."""

    def __init__(self, error_for: Any) -> None:
        self.error_for = error_for
        self.buf = bytearray()
        self.info: dict[str, Any] | None = None
        self.ended: StreamEnded | None = None
        self.count = 0

    @staticmethod
    def open_frame(model: str, version: str | None, opts: Mapping[str, Any]) -> list[Any]:
        doc: dict[str, Any] = {"m": model, "opts": {k: v for k, v in opts.items() if v is not None}}
        if version is not None:
            doc["v"] = version
        return fr.encode_frame(fr.STREAM_OPEN, doc)

    def push_frame(self, item: Any) -> list[Any]:
        if isinstance(item, tuple) and len(item) == 3:
            item_id, ts, array = item
        elif isinstance(item, tuple) and len(item) == 2:
            (item_id, array), ts = item, None
        else:
            item_id, ts, array = self.count, None, item
        self.count += 1
        name = self.info["input"] if self.info else ""
        meta: dict[str, Any] = {"id": item_id}
        if ts is not None:
            meta["ts"] = ts
        return fr.encode_frame(fr.STREAM_PUSH, meta, {name: np.asarray(array)})

    @staticmethod
    def close_frame() -> list[Any]:
        return fr.encode_frame(fr.STREAM_CLOSE, {})

    def feed(self, data: bytes) -> list[StreamResult]:
        """Take received bytes; return the results they complete (sets ``info`` / ``ended``)."""
        self.buf += data
        out: list[StreamResult] = []
        while len(self.buf) >= fr.HEADER.size:
            body_len, kind, meta_len = fr.parse_header(self.buf, MAX_REPLY_BYTES)
            need = fr.HEADER.size + body_len
            if len(self.buf) < need:
                break
            body = bytes(memoryview(self.buf)[fr.HEADER.size : need])
            del self.buf[:need]
            meta, data_view = fr.decode_body(body, meta_len)
            if kind == fr.ERROR:
                raise self.error_for(int(meta.get("status", 500)), str(meta.get("error")), None)
            if kind == fr.OK:
                self.info = dict(meta.get("stream", {}))
            elif kind == fr.STREAM_END:
                self.ended = StreamEnded(str(meta.get("reason")), int(meta["results"]), int(meta["dropped"]))
            elif kind == fr.STREAM_RESULT:
                arrays = fr.decode_tensors(meta, data_view, meta_len) if "t" in meta else {}
                out.append(_result(meta, arrays))
        return out


def _result(meta: Mapping[str, Any], arrays: dict[str, np.ndarray]) -> StreamResult:
    return StreamResult(
        id=meta.get("id"),
        ts=meta.get("ts"),
        seq=int(meta.get("seq", 0)),
        dropped=int(meta.get("dropped", 0)),
        lag_ms=float(meta.get("lag_ms", 0.0)),
        run_ms=float(meta.get("run_ms", 0.0)),
        queued=int(meta.get("queued", 0)),
        outputs=arrays,
        error=meta.get("error"),
        status=int(meta.get("status", 0)),
    )


class Stream:
    """A stream of ``items`` through ``model``: iterate it (``for`` or ``async for``) for the results.

    After iteration, ``info`` is the stream the daemon accepted and ``ended`` how it ended.
    """

    def __init__(
        self,
        path: str,
        model: str,
        items: Iterable[Any] | AsyncIterable[Any],
        options: Mapping[str, Any],
        *,
        version: str | None,
        timeout: float,
        error_for: Any,
    ) -> None:
        self.path, self.model, self.items, self.options = path, model, items, dict(options)
        self.version, self.timeout = version, timeout
        self._codec = _Codec(error_for)

    @property
    def info(self) -> dict[str, Any] | None:
        """The accepted stream (input name, datatype, item shape, policy, window...)."""
        return self._codec.info

    @property
    def ended(self) -> StreamEnded | None:
        """How the stream ended, once it has."""
        return self._codec.ended

    # -- sync shell ---------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[StreamResult]:
        if not isinstance(self.items, Iterable):
            raise InputError("iterate an async item source with `async for`")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        failure: list[BaseException] = []
        try:
            try:
                sock.connect(self.path)
            except OSError as exc:
                raise ServeError(f"cannot connect to the edgert socket {self.path}: {exc}") from None
            pending = self._open_sync(sock)
            sender = threading.Thread(target=self._send_all, args=(sock, failure), daemon=True)
            sender.start()
            yield from pending
            while self._codec.ended is None:
                data = sock.recv(STREAM_RECV_BYTES)
                if not data:
                    if failure and not isinstance(failure[0], OSError):
                        raise failure[0]
                    raise ServeError("the daemon closed the stream without ending it")
                yield from self._codec.feed(data)
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if failure and not isinstance(failure[0], OSError):
            raise failure[0]

    def _open_sync(self, sock: socket.socket) -> list[StreamResult]:
        sock.sendall(
            b"".join(bytes(b) for b in self._codec.open_frame(self.model, self.version, self.options))
        )
        pending: list[StreamResult] = []
        while self._codec.info is None:
            data = sock.recv(STREAM_RECV_BYTES)
            if not data:
                raise ServeError("the daemon closed the connection while opening the stream")
            pending += self._codec.feed(data)
        return pending

    def _send_all(self, sock: socket.socket, failure: list[BaseException]) -> None:
        try:
            for item in self.items:  # type: ignore[union-attr]
                _sendall(sock, self._codec.push_frame(item))
            _sendall(sock, self._codec.close_frame())
        except BaseException as exc:  # reported by the iterating thread
            failure.append(exc)
            try:
                sock.shutdown(socket.SHUT_WR)  # the daemon ends the stream; the reader stops
            except OSError:
                pass

    # -- async shell --------------------------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[StreamResult]:
        try:
            reader, writer = await asyncio.open_unix_connection(self.path, limit=STREAM_RECV_BYTES)
        except OSError as exc:
            raise ServeError(f"cannot connect to the edgert socket {self.path}: {exc}") from None
        sender: asyncio.Task[None] | None = None
        try:
            writer.writelines(self._codec.open_frame(self.model, self.version, self.options))
            pending: list[StreamResult] = []
            while self._codec.info is None:
                pending += self._codec.feed(await self._read(reader))
            sender = asyncio.ensure_future(self._send_async(writer))
            for r in pending:
                yield r
            while self._codec.ended is None:
                for r in self._codec.feed(await self._read(reader)):
                    yield r
            await sender
        finally:
            if sender is not None and not sender.done():
                sender.cancel()
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    async def _read(self, reader: asyncio.StreamReader) -> bytes:
        data = await asyncio.wait_for(reader.read(STREAM_RECV_BYTES), self.timeout)
        if not data:
            raise ServeError("the daemon closed the stream without ending it")
        return data

    async def _send_async(self, writer: asyncio.StreamWriter) -> None:
        items = self.items
        if isinstance(items, AsyncIterable):
            async for item in items:
                writer.writelines(self._codec.push_frame(item))
                await writer.drain()  # back-pressure under "all"
        else:
            for item in items:
                writer.writelines(self._codec.push_frame(item))
                await writer.drain()
        writer.writelines(self._codec.close_frame())
        await writer.drain()


def _sendall(sock: socket.socket, buffers: list[Any]) -> None:
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if views and sent:
            views[0] = views[0][sent:]
