"""Issue 9 A1/A2/A3 (Unix socket): abusive clients must not grow the daemon's memory.

The server runs in its own process (tests/reliability/serve_proc.py: the real daemon with the digits
models and a socket server with its default limits) so that its RSS is measured alone. Reported
(2026-12): a client with SO_RCVBUF=4096 sending 2 MB of STATUS frames and never reading raised RSS
from 209 to 705 MB; four connections each declaring a 256 MiB frame and sending 100 MB raised it
from 94 to 494 MB and stayed open 35 s after going idle; memory stayed at its peak afterwards.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.errors import InputError
from edgert.serve import uds_frames as fr
from edgert.serve.uds_limits import AUTO_FRAME_MIN
from tests.reliability.serve_proc import ServeProc, flood, wait_rss_below

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: DESIGN §5: one abusive local client grows RSS by less than this.
GROWTH_LIMIT_MB = 40.0
#: Issue 9 A3: once the abuser is gone, RSS is back within this fraction of its level before.
RETURN_FRACTION = 0.10
#: How long the huge-frame connections may stay open once idle: above the default read timeout (30 s).
IDLE_WAIT_S = 45.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServeProc]:
    """A fresh server process per test, so each starts from a clean heap."""
    proc = ServeProc(tmp_path)
    yield proc
    proc.stop()


def warm_up(server: ServeProc) -> float:
    """Serve a few ordinary requests on both listeners, then return the settled RSS (MB)."""
    for _ in range(20):
        assert server.http_ready() and server.socket_ready()
    return server.settle()


def count_closed(conns: list[socket.socket], wait_s: float) -> int:
    """How many of ``conns`` the server closes within ``wait_s`` (reading and dropping any reply)."""
    import select
    import time

    open_ = list(conns)
    closed = 0
    deadline = time.monotonic() + wait_s
    while open_ and time.monotonic() < deadline:
        readable, _, _ = select.select(open_, [], [], max(0.0, deadline - time.monotonic()))
        for s in readable:
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed += 1
                open_.remove(s)
    return closed


def status_frame() -> bytes:
    """One STATUS request frame."""
    return b"".join(bytes(b) for b in fr.encode_frame(fr.STATUS, {}))


def test_status_frames_without_reading_are_bounded_and_memory_returns(server: ServeProc) -> None:
    base = warm_up(server)
    abuser = socket.socket(socket.AF_UNIX)
    abuser.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    abuser.connect(server.socket)
    peak: list[float] = []
    sent = flood(abuser, status_frame(), 2 << 20, server, peak)
    peak.append(server.settle())
    ready = server.http_ready() and server.socket_ready()
    abuser.close()
    after = wait_rss_below(server, base * (1 + RETURN_FRACTION))
    numbers = (f"RSS {base:.0f} MB -> peak {max(peak):.0f} MB -> {after:.0f} MB after; "
               f"sent {sent / 1e6:.1f} MB")
    print(numbers)
    assert max(peak) - base < GROWTH_LIMIT_MB, numbers
    assert ready
    assert after <= base * (1 + RETURN_FRACTION), numbers


def test_huge_declared_frames_on_four_connections_are_bounded_and_memory_returns(
    server: ServeProc,
) -> None:
    base = warm_up(server)
    header = fr.HEADER.pack(256 * 1024 * 1024, fr.INFER, 0, 0, 2)
    peak: list[float] = []
    conns = []
    sent = 0
    for _ in range(4):
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.socket)
        s.sendall(header)
        conns.append(s)
        sent += flood(s, b"\0" * (1 << 20), 100 * 1000 * 1000, server, peak)
    peak.append(server.settle())
    ready = server.http_ready() and server.socket_ready()
    # Idle now: the server must not keep these connections (and their buffers) open.
    closed_by_server = count_closed(conns, IDLE_WAIT_S)
    for s in conns:
        s.close()
    after = wait_rss_below(server, base * (1 + RETURN_FRACTION))
    numbers = (f"RSS {base:.0f} MB -> peak {max(peak):.0f} MB -> {after:.0f} MB after; "
               f"sent {sent / 1e6:.0f} MB; {closed_by_server}/4 closed by the server")
    print(numbers)
    assert max(peak) - base < GROWTH_LIMIT_MB, numbers
    assert ready
    assert closed_by_server == 4, numbers
    assert after <= base * (1 + RETURN_FRACTION), numbers


#: Connections of the many-connections abuse: each may hold a frame at the default cap.
MANY_CONNECTIONS = 20


def test_many_connections_with_frames_at_the_cap_stay_within_the_budget(server: ServeProc) -> None:
    """The frame cap alone would allow 20 x 4 MiB = +84 MB; the server-wide budget bounds it."""
    base = warm_up(server)
    header = fr.HEADER.pack(AUTO_FRAME_MIN, fr.INFER, 0, 0, 2)
    peak: list[float] = []
    conns = []
    for _ in range(MANY_CONNECTIONS):
        s = socket.socket(socket.AF_UNIX)
        s.connect(server.socket)
        s.sendall(header)
        conns.append(s)
        flood(s, b"\0" * 65536, AUTO_FRAME_MIN - 1, server, peak)  # all but the last byte
    peak.append(server.settle())
    ready = server.http_ready() and server.socket_ready()
    for s in conns:
        s.close()
    with Client(f"unix://{server.socket}", timeout=60) as c:  # large frames flow again
        with pytest.raises(InputError, match="batch size 4000 exceeds"):
            c.infer("digits-small", {"pixels": np.zeros((4000, 64), np.float32)})
    after = wait_rss_below(server, base * (1 + RETURN_FRACTION))
    numbers = f"RSS {base:.0f} MB -> peak {max(peak):.0f} MB -> {after:.0f} MB after"
    print(numbers)
    assert max(peak) - base < GROWTH_LIMIT_MB, numbers
    assert ready
    assert after <= base * (1 + RETURN_FRACTION), numbers
