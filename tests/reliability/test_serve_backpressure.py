"""Issue 9 A1/A3 (HTTP): a client pipelining without reading must not grow the daemon's memory.

The server runs in its own process (tests/reliability/serve_proc.py: the real daemon with the digits
models) so that its RSS is measured alone. Reported (2026-12): 8 MB of pipelined ``GET /v2/status``
that were never read raised RSS from 94 to 217 MB, and memory stayed at its peak afterwards.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.serve_proc import ServeProc, flood, wait_rss_below

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: DESIGN §5: one abusive local client grows RSS by less than this.
GROWTH_LIMIT_MB = 40.0
#: Issue 9 A3: once the abuser is gone, RSS is back within this fraction of its level before.
RETURN_FRACTION = 0.10
STATUS_REQUEST = b"GET /v2/status HTTP/1.1\r\nhost: localhost\r\n\r\n"


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


def test_http_pipelining_without_reading_is_bounded_and_memory_returns(server: ServeProc) -> None:
    base = warm_up(server)
    abuser = socket.socket()
    abuser.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    abuser.connect(server.http)
    peak: list[float] = []
    sent = flood(abuser, STATUS_REQUEST, 8 << 20, server, peak)
    peak.append(server.settle())
    # The daemon keeps serving others while the abuser still holds its connection.
    ready = server.http_ready() and server.socket_ready()
    abuser.close()
    after = wait_rss_below(server, base * (1 + RETURN_FRACTION))
    numbers = f"RSS {base:.0f} MB -> peak {max(peak):.0f} MB -> {after:.0f} MB after; sent {sent / 1e6:.1f} MB"
    print(numbers)
    assert max(peak) - base < GROWTH_LIMIT_MB, numbers
    assert ready
    assert after <= base * (1 + RETURN_FRACTION), numbers
