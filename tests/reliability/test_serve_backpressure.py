"""Issue 9 A1/A3 (HTTP): a client pipelining without reading must not grow the daemon's memory.

The server runs in its own process (tests/reliability/serve_proc.py: the real daemon with the digits
models) so that its RSS is measured alone. Reported (2026-12): 8 MB of pipelined ``GET /v2/status``
that were never read raised RSS from 94 to 217 MB, and memory stayed at its peak afterwards.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.errors import InputError
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
    numbers = (f"RSS {base:.0f} MB -> peak {max(peak):.0f} MB -> {after:.0f} MB after; "
               f"sent {sent / 1e6:.1f} MB")
    print(numbers)
    assert max(peak) - base < GROWTH_LIMIT_MB, numbers
    assert ready
    assert after <= base * (1 + RETURN_FRACTION), numbers


#: The burst: clients per listener and requests per client. Each request carries more rows than
#: the engine's batch limit, so it is received and decoded in full, then refused without running.
BURST_CLIENTS = 8
BURST_REQUESTS = 3
#: Issue 9 A3: within 10% for JSON too, now that large JSON bodies are parsed straight into numpy
#: buffers (no Python float per number to pin allocator arenas; it needed 15% before).
JSON_RETURN_FRACTION = 0.10


@pytest.mark.parametrize(
    ("encoding", "rows", "fraction"),
    [("binary", 14000, RETURN_FRACTION), ("json", 4000, JSON_RETURN_FRACTION)],
)
def test_memory_returns_after_a_burst_of_large_requests(
    server: ServeProc, encoding: str, rows: int, fraction: float
) -> None:
    """Issue 9 A3: ordinary large requests on both listeners at once, then the clients leave.

    Binary: 3.6 MB tensors (under the socket's 4 MiB default frame cap). JSON: 5 MB bodies.
    """
    base = warm_up(server)
    x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    if encoding == "json":
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape),
                                       "data": x.reshape(-1).tolist()}]}).encode()
        headers = {"content-type": "application/json"}
    else:
        head = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(x.shape),
                                       "parameters": {"binary_data_size": x.nbytes}}]}).encode()
        body = head + x.tobytes()
        headers = {"inference-header-content-length": str(len(head))}
    answers: list[int] = []

    def over_http() -> None:
        conn = http.client.HTTPConnection(*server.http, timeout=60)
        try:
            for _ in range(BURST_REQUESTS):
                conn.request("POST", "/v2/models/digits-small/infer", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                answers.append(resp.status)
        finally:
            conn.close()

    def over_socket() -> None:
        with Client(f"unix://{server.socket}", timeout=60) as c:
            for _ in range(BURST_REQUESTS):
                with pytest.raises(InputError, match="batch size"):
                    c.infer("digits-small", {"pixels": x})
                answers.append(400)

    threads = [threading.Thread(target=f) for f in (over_http, over_socket) for _ in range(BURST_CLIENTS)]
    peak = [base]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak.append(server.rss_mb())
        threads[0].join(0.05)
    for t in threads:
        t.join(120)
    assert answers == [400] * (2 * BURST_CLIENTS * BURST_REQUESTS)
    server.settle()
    after = wait_rss_below(server, base * (1 + fraction))
    numbers = f"{encoding}: RSS {base:.0f} MB -> peak {max(peak):.0f} MB -> {after:.0f} MB after they left"
    print(numbers)
    assert server.http_ready() and server.socket_ready()
    assert after <= base * (1 + fraction), numbers
