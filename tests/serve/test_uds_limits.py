"""Issue 9 A1/A2 and issue 8 item 8: the socket server's limits, back-pressure and socket-path ownership,
over real sockets against the real daemon's backend (extra servers started on the daemon's loop).
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edgert.errors import ConfigError
from edgert.serve import memory
from edgert.serve import uds_frames as fr
from edgert.serve.http_server import HttpLimits, HttpServer
from edgert.serve.oip_http import OipRouter
from edgert.serve.port import ModelMeta, TensorMeta
from edgert.serve.uds import UdsLimits, UdsServer
from edgert.serve.uds_limits import (
    AUTO_BATCH_ROWS,
    AUTO_FRAME_MAX,
    AUTO_FRAME_MIN,
    META_ALLOWANCE,
    frame_cap_for,
)
from tests.serve.daemon_harness import Running
from tests.serve.test_uds import frame, read_frame

pytestmark = pytest.mark.integration

WAIT_S = 30.0


@contextmanager
def extra_server(served: Running, tmp_path: Path, limits: UdsLimits | None = None,
                 **kwargs: int) -> Iterator[tuple[UdsServer, str]]:
    """A UdsServer over the daemon's backend on its loop, at a socket of its own."""
    server = UdsServer(served.daemon.backend, limits, **kwargs)
    path = tmp_path / "extra.sock"
    served.call(server.start(path))
    try:
        yield server, str(path)
    finally:
        served.call(server.stop())


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(WAIT_S)
    s.connect(path)
    return s


def wait_until(condition: object, timeout: float = WAIT_S) -> bool:
    """Poll ``condition()`` until true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return bool(condition())  # type: ignore[operator]


def test_idle_connection_is_closed(served: Running, tmp_path: Path) -> None:
    with extra_server(served, tmp_path, UdsLimits(idle_timeout_s=0.3)) as (_, path), connect(path) as s:
        s.sendall(frame(fr.READY, {}))
        assert read_frame(s)[0] == fr.OK
        assert s.recv(1) == b""  # closed by the server once idle


def test_frame_not_completed_in_time_gets_408_then_close(served: Running, tmp_path: Path) -> None:
    data = frame(fr.INFER, {"m": "digits-small"}, {"pixels": np.zeros((2, 64), np.float32)})
    with extra_server(served, tmp_path, UdsLimits(read_timeout_s=0.3)) as (_, path), connect(path) as s:
        s.sendall(data[: len(data) // 2])
        kind, doc, _ = read_frame(s)
        assert kind == fr.ERROR and doc["status"] == 408, doc
        assert s.recv(1) == b""


def test_connections_over_the_cap_get_503(served: Running, tmp_path: Path) -> None:
    with extra_server(served, tmp_path, UdsLimits(max_connections=2)) as (_, path):
        with connect(path) as a, connect(path) as b:
            for s in (a, b):
                s.sendall(frame(fr.READY, {}))
                assert read_frame(s)[0] == fr.OK
            with connect(path) as c:
                kind, doc, _ = read_frame(c)
                assert kind == fr.ERROR and doc["status"] == 503 and "too many connections" in doc["error"]
                assert c.recv(1) == b""
            a.sendall(frame(fr.READY, {}))
            assert read_frame(a)[0] == fr.OK


def test_default_frame_cap_is_sized_from_the_served_models(served: Running, tmp_path: Path) -> None:
    with extra_server(served, tmp_path) as (server, path):
        # digits takes 64 floats a row: far below the floor, so the floor applies.
        assert server.max_frame_bytes == AUTO_FRAME_MIN
        with connect(path) as s:  # a 1 MB frame is within the cap: the engine answers it
            s.sendall(frame(fr.INFER, {"m": "digits-small"}, {"pixels": np.zeros((4000, 64), np.float32)}))
            kind, doc, _ = read_frame(s)
            assert kind == fr.ERROR and "batch size 4000 exceeds" in doc["error"]
        with connect(path) as s:  # one byte over is refused from the header, before any body
            s.sendall(fr.HEADER.pack(AUTO_FRAME_MIN + 1, fr.INFER, 0, 0, 2))
            kind, doc, _ = read_frame(s)
            assert kind == fr.ERROR and doc["status"] == 400
            assert f"exceeds the {AUTO_FRAME_MIN}-byte limit" in doc["error"]
            assert "max_frame_bytes" in doc["error"]  # the hint says what to change
            assert s.recv(1) == b""


def test_max_frame_bytes_keyword_still_fixes_the_cap(served: Running, tmp_path: Path) -> None:
    with extra_server(served, tmp_path, max_frame_bytes=1024) as (server, path), connect(path) as s:
        assert server.max_frame_bytes == 1024
        s.sendall(frame(fr.INFER, {"m": "digits-small"}, {"pixels": np.zeros((8, 64), np.float32)}))
        kind, doc, _ = read_frame(s)
        assert kind == fr.ERROR and "exceeds the 1024-byte limit" in doc["error"]


def flood_without_reading(s: socket.socket, payload: bytes, limit: int) -> int:
    """Send ``payload`` until the server stops reading (nothing accepted for 1 s) or ``limit`` bytes."""
    s.setblocking(False)
    block = payload * max(1, 65536 // len(payload))
    sent = 0
    while sent < limit:
        if not select.select([], [s], [], 1.0)[1]:
            break
        try:
            sent += s.send(block)
        except BlockingIOError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
    return sent


def test_socket_client_that_never_reads_is_held_then_dropped(served: Running, tmp_path: Path) -> None:
    limits = UdsLimits(write_high_water=4096, write_timeout_s=0.5)
    with extra_server(served, tmp_path, limits) as (server, path):
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(path)
        with s:
            sent = flood_without_reading(s, frame(fr.STATUS, {}), 64 << 20)
            assert sent < 64 << 20  # the server stopped reading: back-pressure
            assert wait_until(lambda: not server.connections), "a client that reads nothing is dropped"


def test_http_client_that_never_reads_is_held_then_dropped(served: Running) -> None:
    limits = HttpLimits(write_high_water=4096, write_timeout_s=0.5)
    server = HttpServer(OipRouter(served.daemon.backend), limits)
    host, port = served.call(server.start("127.0.0.1", 0))  # type: ignore[misc]
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        with s:
            sent = flood_without_reading(s, b"GET /v2/status HTTP/1.1\r\nhost: x\r\n\r\n", 256 << 20)
            assert sent < 256 << 20  # the server stopped reading: back-pressure
            assert wait_until(lambda: not server.connections), "a client that reads nothing is dropped"
    finally:
        served.call(server.stop())


def test_start_refuses_a_path_a_live_server_answers_on(served: Running, tmp_path: Path) -> None:
    with extra_server(served, tmp_path) as (_, path):
        second = UdsServer(served.daemon.backend)
        with pytest.raises(ConfigError, match=f"another edgert daemon is serving on {path}: stop it"):
            served.call(second.start(path))
        with connect(path) as s:  # the first is untouched
            s.sendall(frame(fr.READY, {}))
            assert read_frame(s)[0] == fr.OK
    assert not os.path.exists(path)  # and removes its own socket at stop


def test_stop_leaves_a_socket_file_that_is_no_longer_ours(served: Running, tmp_path: Path) -> None:
    path = tmp_path / "extra.sock"
    with extra_server(served, tmp_path):
        os.unlink(path)  # someone else takes the path over
        other = socket.socket(socket.AF_UNIX)
        other.bind(str(path))
        other.listen(1)
    with other:
        assert path.exists(), "stop removed a socket file another server had bound"
        with connect(str(path)):
            pass


def test_refuses_a_path_that_is_not_a_socket(served: Running, tmp_path: Path) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("keep me")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        served.call(UdsServer(served.daemon.backend).start(path))
    assert path.read_text() == "keep me"


# ---- pure logic -------------------------------------------------------------------------------
def meta(*inputs: tuple[str, tuple[int | None, ...]]) -> ModelMeta:
    tensors = tuple(TensorMeta(n, np.dtype(np.float32), s) for n, s in inputs)
    return ModelMeta("m", ("1",), "onnx", tensors, ())


def test_frame_cap_for_models() -> None:
    mobilenet = meta(("image", (None, 3, 224, 224)))
    assert frame_cap_for([mobilenet]) == AUTO_BATCH_ROWS * 3 * 224 * 224 * 4 + 8 + META_ALLOWANCE
    assert frame_cap_for([meta(("x", (1, 3, 224, 224)))]) == AUTO_FRAME_MIN  # 602 KB < the floor
    assert frame_cap_for([meta(("x", (None, 3, None, None)))]) == AUTO_FRAME_MAX  # unknowable
    assert frame_cap_for([meta(("x", (4096, 4096, 4)))]) == AUTO_FRAME_MAX  # capped
    assert frame_cap_for([]) == AUTO_FRAME_MIN
    assert frame_cap_for([meta(("x", (None, 64))), mobilenet]) == frame_cap_for([mobilenet])


@pytest.mark.parametrize("field", ["read_timeout_s", "max_connections", "max_frame_bytes"])
def test_uds_limits_refuse_nonsense(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        UdsLimits(**{field: 0})


@pytest.mark.skipif(not memory.trim_available(), reason="needs glibc malloc_trim")
def test_trim_requests_coalesce_and_run_off_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "TRIM_DELAY_S", 0.01)
    loop = asyncio.new_event_loop()
    ran: list[object] = []
    real = loop.run_in_executor

    def counting(executor: object, func: object, *args: object) -> asyncio.Future[object]:
        ran.append(func)
        return real(executor, func, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "run_in_executor", counting)

    async def burst() -> None:
        for _ in range(50):
            memory.request_trim()
        await asyncio.sleep(0.5)
        memory.request_trim()  # a later burst gets a trim of its own
        await asyncio.sleep(0.5)

    try:
        loop.run_until_complete(burst())
    finally:
        loop.close()
    assert ran == [memory.trim_heap, memory.trim_heap]
    assert isinstance(memory.trim_heap(), bool)


def test_output_cap_drops_a_client_whose_unread_replies_pile_up(served: Running, tmp_path: Path) -> None:
    """The backstop behind back-pressure: with a high-water mark above the cap, the cap acts."""
    limits = UdsLimits(write_high_water=8 << 20, max_output_bytes=64 * 1024, write_timeout_s=3600)
    with extra_server(served, tmp_path, limits) as (server, path):
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(path)
        with s:
            flood_without_reading(s, frame(fr.STATUS, {}), 64 << 20)
            assert wait_until(lambda: not server.connections), "unread replies over the cap drop the client"


def test_http_output_cap_drops_a_client_whose_unread_responses_pile_up(served: Running) -> None:
    limits = HttpLimits(write_high_water=8 << 20, max_output_bytes=64 * 1024, write_timeout_s=3600)
    server = HttpServer(OipRouter(served.daemon.backend), limits)
    host, port = served.call(server.start("127.0.0.1", 0))  # type: ignore[misc]
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((host, port))
        with s:
            flood_without_reading(s, b"GET /v2/status HTTP/1.1\r\nhost: x\r\n\r\n", 256 << 20)
            assert wait_until(lambda: not server.connections), "unread responses over the cap drop the client"
    finally:
        served.call(server.stop())


def test_large_frames_take_turns_within_the_budget(served: Running, tmp_path: Path) -> None:
    """Budget for one large frame at a time: several clients pipelining large frames all get answers."""
    limits = UdsLimits(max_frame_bytes=256 * 1024, max_buffered_bytes=1)  # the budget becomes the cap
    x = np.zeros((600, 64), np.float32)  # 153 KB: above the budget's small-frame threshold
    with extra_server(served, tmp_path, limits) as (server, path):
        assert server.budget.total == 256 * 1024
        clients = [connect(path) for _ in range(4)]
        try:
            for s in clients:
                s.sendall(frame(fr.INFER, {"m": "digits-small"}, {"pixels": x}) * 3)
            for s in clients:
                for _ in range(3):
                    kind, doc, _ = read_frame(s)
                    assert kind == fr.ERROR and "batch size 600 exceeds" in doc["error"]
        finally:
            for s in clients:
                s.close()
        assert wait_until(lambda: server.budget.used == 0 and not server.budget.waiting)


def test_a_stalled_large_frame_holds_the_budget_only_until_its_read_timeout(
    served: Running, tmp_path: Path
) -> None:
    limits = UdsLimits(max_frame_bytes=256 * 1024, max_buffered_bytes=1, read_timeout_s=0.5)
    data = frame(fr.INFER, {"m": "digits-small"}, {"pixels": np.zeros((600, 64), np.float32)})
    with extra_server(served, tmp_path, limits) as (server, path), connect(path) as stalled, \
            connect(path) as s:
        stalled.sendall(data[:1000])  # takes the whole budget, then goes quiet
        assert wait_until(lambda: server.budget.used > 0)
        s.sendall(data)  # waits for the budget, is not timed out meanwhile, then is answered
        kind, doc, _ = read_frame(s)
        assert kind == fr.ERROR and "batch size 600 exceeds" in doc["error"]
        kind, doc, _ = read_frame(stalled)
        assert kind == fr.ERROR and doc["status"] == 408


def test_frame_budget_is_fifo_and_never_over_commits() -> None:
    from edgert.serve.uds_limits import FrameBudget

    b = FrameBudget(10)
    assert b.reserve("a", 6)
    assert not b.reserve("b", 6)  # would over-commit: waits
    assert not b.reserve("c", 1)  # fits, but "b" is first in line
    assert b.release(6) == ["b", "c"] and b.used == 7
    assert not b.reserve("d", 5)
    assert b.cancel("d") == [] and not b.waiting
    assert b.release(7) == [] and b.used == 0
