"""Streams over WebSocket against a real daemon: the independent ``websockets`` client, and raw
sockets for broken framing (unmasked client frames, fragmented control frames, oversized frames)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import Iterator

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from edgert.client import Client
from edgert.serve import uds_frames as fr
from edgert.serve import ws_streams
from edgert.serve.http_server import HttpServer
from edgert.serve.oip_http import OipRouter
from tests.serve.daemon_harness import Running
from tests.serve.test_uds import frame
from tests.serve.test_uds_limits import wait_until

pytestmark = pytest.mark.integration

MODEL = "digits-small"
TOKEN = "s3cret-token"
TIMEOUT_S = 30.0


def url(served: Running, model: str = MODEL) -> str:
    host, port = served.http
    return f"ws://{host}:{port}/v2/models/{model}/stream"


def push(i: int, x: np.ndarray) -> bytes:
    return frame(fr.STREAM_PUSH, {"id": i, "ts": i / 30}, {"pixels": x})


def parse(message: bytes) -> tuple[int, dict, dict[str, np.ndarray]]:
    _, kind, meta_len = fr.parse_header(message, 1 << 30)
    meta, data = fr.decode_body(message[fr.HEADER.size :], meta_len)
    return kind, meta, (fr.decode_tensors(meta, data, meta_len) if "t" in meta else {})


async def collect(ws) -> tuple[list, dict]:
    """Results (binary frames or JSON) until the end message."""
    results = []
    async for message in ws:
        if isinstance(message, bytes):
            kind, meta, arrays = parse(message)
            if kind == fr.STREAM_END:
                return results, meta
            meta["outputs"] = arrays
            results.append(meta)
        else:
            doc = json.loads(message)
            if doc["type"] == "end":
                return results, doc
            results.append(doc)
    raise AssertionError("closed without an end message")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


def test_json_all_results_in_order_match_requests(served: Running, digits) -> None:
    x, _ = digits

    async def go():
        async with connect(url(served)) as ws:
            await ws.send(json.dumps({"type": "open", "opts": {"policy": "all"}, "results": "json"}))
            opened = json.loads(await ws.recv())
            for i in range(10):
                await ws.send(json.dumps({"type": "push", "id": f"k{i}", "ts": i, "data": x[i].tolist()}))
            await ws.send(json.dumps({"type": "close"}))
            return opened, *(await collect(ws))

    opened, results, end = run(go())
    assert opened["type"] == "opened" and opened["stream"]["input"] == "pixels"
    assert [r["id"] for r in results] == [f"k{i}" for i in range(10)] and [r["ts"] for r in results] == list(
        range(10)
    )
    with Client("unix://" + served.socket) as c:
        want = c.infer(MODEL, {"pixels": x[:10]})["logits"]
    got = np.array([r["outputs"]["logits"]["data"] for r in results], np.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert end["reason"] == "closed" and end["dropped"] == 0


@pytest.mark.parametrize(("policy", "queue"), [("latest", 1), ("drop-oldest", 3)])
def test_binary_frames_with_dropping_policies_account_for_every_item(
    served: Running, digits, policy, queue
) -> None:
    x, _ = digits
    n = 300

    async def go():
        async with connect(url(served), max_size=None) as ws:
            await ws.send(json.dumps({"type": "open", "opts": {"policy": policy, "queue": queue}}))
            json.loads(await ws.recv())
            for i in range(n):
                ws.protocol.send_binary(push(i, x[i % len(x)]))  # queued without awaiting each
            await ws.send(json.dumps({"type": "close"}))
            return await collect(ws)

    results, end = run(go())
    ids = [r["id"] for r in results]
    assert ids == sorted(ids) and ids[-1] == n - 1
    assert len(results) + sum(r["dropped"] for r in results) == n == len(results) + end["dropped"]
    assert all(r["outputs"]["logits"].shape == (1, 10) for r in results)


def test_deadline_over_websocket(served: Running, digits) -> None:
    x, _ = digits

    async def go():
        async with connect(url(served)) as ws:
            await ws.send(json.dumps({"type": "open", "opts": {"queue": 256, "deadline_ms": 0.001}}))
            await ws.recv()
            for i in range(100):
                ws.protocol.send_binary(push(i, x[i]))
            await ws.send(json.dumps({"type": "close"}))
            return await collect(ws)

    results, end = run(go())
    assert len(results) + end["dropped"] == 100


def test_bad_push_names_expected_and_got_and_the_stream_goes_on(served: Running, digits) -> None:
    x, _ = digits

    async def go():
        async with connect(url(served)) as ws:
            await ws.send(json.dumps({"type": "open", "opts": {"window": 64, "hop": 64}, "results": "json"}))
            await ws.recv()
            await ws.send(push(0, x[0][:32]))
            await ws.send(push(1, x[0][:32].astype(np.float64)))
            await ws.send(json.dumps({"type": "dance"}))
            await ws.send(push(2, x[0][32:]))
            await ws.send(json.dumps({"type": "close"}))
            return await collect(ws)

    results, end = run(go())
    by_id = {r["id"]: r for r in results}
    assert "expected float32 with shape [*], got float64 with shape [32]" in by_id[1]["error"]
    assert any("unknown message type 'dance'" in r.get("error", "") for r in results)
    assert "outputs" in by_id[2] and end["results"] == 1


def test_open_errors_and_unknown_models(served: Running) -> None:
    async def go():
        with pytest.raises(InvalidStatus) as err:
            async with connect(url(served, "nope")):
                pass
        assert err.value.response.status_code == 404
        async with connect(url(served)) as ws:
            await ws.send(json.dumps({"type": "open", "opts": {"policy": "whenever"}}))
            doc = json.loads(await ws.recv())
            assert doc["type"] == "error" and "policy must be one of" in doc["error"]
            await ws.wait_closed()
            assert ws.close_code == 1008

    run(go())


@pytest.fixture
def guarded(served: Running) -> Iterator[tuple[str, int]]:
    """An HTTP server with a bearer token, over the daemon's backend."""
    server = HttpServer(OipRouter(served.daemon.backend, token=TOKEN))
    address = served.call(server.start("127.0.0.1", 0))
    yield address  # type: ignore[misc]
    served.call(server.stop())


def test_websocket_is_authenticated_like_http(guarded, digits) -> None:
    x, _ = digits
    host, port = guarded
    ws_url = f"ws://{host}:{port}/v2/models/{MODEL}/stream"

    async def one(**kw) -> list:
        async with connect(ws_url, **kw) as ws:
            await ws.send(json.dumps({"type": "open", "results": "json"}))
            await ws.recv()
            await ws.send(json.dumps({"type": "push", "id": 1, "data": x[0].tolist()}))
            await ws.send(json.dumps({"type": "close"}))
            return (await collect(ws))[0]

    async def go():
        for kw in (
            {},
            {"additional_headers": {"Authorization": "Bearer wrong"}},
            {"subprotocols": ["edgert", "edgert.bearer.wrong"]},
        ):
            with pytest.raises(InvalidStatus) as err:
                await one(**kw)
            assert err.value.response.status_code == 401
        assert len(await one(additional_headers={"Authorization": f"Bearer {TOKEN}"})) == 1
        # browsers cannot set headers: the token rides in a subprotocol, and "edgert" is selected
        async with connect(ws_url, subprotocols=["edgert", f"edgert.bearer.{TOKEN}"]) as ws:
            assert ws.subprotocol == "edgert"

    run(go())


# -- raw sockets: framing the websockets library would never send ---------------------------------------
def handshake(served: Running, rcvbuf: int | None = None) -> socket.socket:
    host, port = served.http
    s = socket.socket()
    s.settimeout(TIMEOUT_S)
    if rcvbuf is not None:  # before connect, so the TCP window stays small
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /v2/models/{MODEL}/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        assert chunk, "closed during the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def ws_frame(
    opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True, length: int | None = None
) -> bytes:
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def close_code(s: socket.socket) -> int:
    """Read frames until the server's close frame; return its code."""
    data = b""
    while True:
        chunk = s.recv(65536)
        assert chunk, "connection closed without a close frame"
        data += chunk
        while len(data) >= 2:
            opcode, n = data[0] & 0x0F, data[1] & 0x7F
            start = 2
            if n == 126:
                n, start = struct.unpack("!H", data[2:4])[0], 4
            elif n == 127:
                n, start = struct.unpack("!Q", data[2:10])[0], 10
            if len(data) < start + n:
                break
            payload, data = data[start : start + n], data[start + n :]
            if opcode == 0x8:
                return int(struct.unpack("!H", payload[:2])[0])


def still_serving(served: Running) -> bool:
    with Client(served.http_url) as c:
        return c.ready()


def test_unmasked_client_frame_closes_with_protocol_error(served: Running) -> None:
    with handshake(served) as s:
        s.sendall(ws_frame(0x1, b'{"type": "open"}', masked=False))
        assert close_code(s) == 1002
    assert still_serving(served)


def test_fragmented_control_frame_closes_with_protocol_error(served: Running) -> None:
    with handshake(served) as s:
        s.sendall(ws_frame(0x9, b"ping", fin=False))
        assert close_code(s) == 1002
    assert still_serving(served)


def test_oversized_message_closes_with_1009(served: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ws_streams, "MAX_MESSAGE_BYTES", 64 * 1024)
    with handshake(served) as s:
        s.sendall(ws_frame(0x1, json.dumps({"type": "open"}).encode()))
        # a frame declaring 1 GiB: refused once more than the cap has arrived, never buffered whole
        s.sendall(ws_frame(0x2, b"\0" * (128 * 1024), length=1 << 30)[: 14 + 128 * 1024])
        assert close_code(s) == 1009
    # and a message split into many small fragments counts as one
    with handshake(served) as s:
        s.sendall(ws_frame(0x1, json.dumps({"type": "open"}).encode()))
        s.sendall(ws_frame(0x2, b"\0" * 40_000, fin=False) + ws_frame(0x0, b"\0" * 40_000, fin=False))
        assert close_code(s) == 1009
    assert still_serving(served)


def test_ping_is_answered_and_disconnect_mid_window_frees_the_stream(served: Running, digits) -> None:
    x, _ = digits
    streams = served.daemon.metrics.streams
    before = streams.open_streams().get(MODEL, 0)
    with handshake(served) as s:
        s.sendall(ws_frame(0x1, json.dumps({"type": "open", "opts": {"window": 64, "hop": 16}}).encode()))
        s.sendall(ws_frame(0x2, push(0, x[0][:40])) + ws_frame(0x9, b"are you there"))
        got = b""
        while b"are you there" not in got:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        assert b"\x8a\x0dare you there" in got  # a pong (0xA) with the same payload
        assert wait_until(lambda: streams.open_streams().get(MODEL, 0) >= before + 1)
    assert wait_until(lambda: streams.open_streams().get(MODEL, 0) <= before), "it ends with its client"
    assert still_serving(served)


def test_upgrade_elsewhere_is_refused_and_http_goes_on(served: Running) -> None:
    host, port = served.http
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as s:
        s.sendall(
            b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 404") and b"no WebSocket route" in reply
    assert still_serving(served)


def test_client_that_stops_reading_latest_stays_bounded_all_back_pressures(served: Running, digits) -> None:
    from tests.serve.test_uds_streams import flood, rss_kib

    x, _ = digits
    one = ws_frame(0x2, push(0, x[0]))
    burst = one * 20_000
    with handshake(served, rcvbuf=4096) as s:
        s.sendall(ws_frame(0x1, json.dumps({"type": "open", "opts": {"policy": "latest"}}).encode()))
        base = rss_kib()
        sent = flood(s, burst, 3 * len(burst), idle_s=15.0)  # a liveness bound on a busy machine
        assert sent == 3 * len(burst)  # never held: the daemon keeps reading and drops
        assert rss_kib() - base < 40 * 1024
    with handshake(served, rcvbuf=4096) as s:
        s.sendall(ws_frame(0x1, json.dumps({"type": "open", "opts": {"policy": "all", "queue": 4}}).encode()))
        sent = flood(s, burst, 5 * len(burst))
        assert sent < 5 * len(burst), "the sender is held (back-pressure)"
    assert still_serving(served)


def test_a_thousand_idle_websocket_streams(served: Running, digits) -> None:
    from tests.serve.test_uds_streams import rss_kib

    x, _ = digits
    streams = served.daemon.metrics.streams
    before = streams.open_streams().get(MODEL, 0)  # streams other tests may still be ending
    base = rss_kib()
    socks = []
    try:
        for _ in range(1000):
            s = handshake(served)
            socks.append(s)
            s.sendall(ws_frame(0x1, json.dumps({"type": "open", "opts": {"policy": "latest"}}).encode()))
        assert wait_until(lambda: streams.open_streams().get(MODEL, 0) >= 1000)
        grown = rss_kib() - base
        with Client("unix://" + served.socket) as c:
            assert c.ready() and c.infer(MODEL, {"pixels": x[:1]})["logits"].shape == (1, 10)
        assert still_serving(served)
        assert grown < 96 * 1024, f"1,000 idle WebSocket streams took {grown} KiB"
    finally:
        for s in socks:
            s.close()
    assert wait_until(lambda: streams.open_streams().get(MODEL, 0) <= before), streams.open_streams()


def test_push_after_close_over_websocket_is_refused(served: Running, digits) -> None:
    x, _ = digits
    with handshake(served) as s:
        opened = json.dumps({"type": "open", "results": "json"}).encode()
        late = json.dumps({"type": "push", "id": 3, "data": x[1].tolist()}).encode()
        # one write: the late push arrives before the stream has ended
        s.sendall(ws_frame(0x1, opened) + ws_frame(0x1, b'{"type": "close"}') + ws_frame(0x1, late))
        texts = read_texts(s)
    results = [t for t in texts if t["type"] == "result"]
    assert [r["id"] for r in results] == [3] and "after the stream was closed" in results[0]["error"]
    assert texts[-1] == {"type": "end", "reason": "closed", "results": 0, "dropped": 0}


def read_texts(s: socket.socket) -> list[dict]:
    """Text messages until the server's close frame."""
    data, out = b"", []
    while True:
        chunk = s.recv(65536)
        assert chunk, "connection closed without a close frame"
        data += chunk
        while len(data) >= 2:
            opcode, n, start = data[0] & 0x0F, data[1] & 0x7F, 2
            if n == 126:
                n, start = struct.unpack("!H", data[2:4])[0], 4
            if len(data) < start + n:
                break
            payload, data = data[start : start + n], data[start + n :]
            if opcode == 0x8:
                return out
            out.append(json.loads(payload))
