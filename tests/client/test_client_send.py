"""The client's send helper: small messages joined, large ones vectored and resumed after partial sends."""

from __future__ import annotations

from typing import Any

from edgert.client import _client as client


class PartialSocket:
    """Accepts at most ``step`` bytes per call, like a socket whose send timeout cut a sendmsg short."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.data = bytearray()
        self.calls: list[str] = []

    def sendall(self, data: bytes) -> None:
        self.calls.append("sendall")
        self.data += data

    def sendmsg(self, buffers: list[Any]) -> int:
        self.calls.append("sendmsg")
        joined = b"".join(bytes(b) for b in buffers)[: self.step]
        self.data += joined
        return len(joined)


def test_small_message_is_joined_into_one_send():
    sock = PartialSocket(step=1 << 30)
    client._send_all(sock, [b"head", memoryview(b"body"), b"!"])  # type: ignore[arg-type]
    assert sock.calls == ["sendall"] and bytes(sock.data) == b"headbody!"


def test_large_message_survives_partial_sendmsg():
    parts = [b"h" * 10, bytes(range(256)) * 400, b"t" * 70_000]
    want = b"".join(parts)
    assert len(want) > client.JOIN_MAX_BYTES
    sock = PartialSocket(step=7_777)  # cuts inside and across buffers
    client._send_all(sock, [parts[0], memoryview(parts[1]), parts[2]])  # type: ignore[arg-type]
    assert bytes(sock.data) == want
    assert set(sock.calls) == {"sendmsg"} and len(sock.calls) == -(-len(want) // 7_777)
