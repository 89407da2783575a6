"""The session protocol over a real pty: HELLO, requests, errors, NAK/retry, chunked transfer with resume."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from typing import Any

import pytest

from edgert.errors import ProvisionError
from edgert.provision.frames import MsgType, encode_frame
from edgert.provision.session import (
    DeviceRefusal,
    DeviceSession,
    ErrorCode,
    HostSession,
    NoAnswerError,
    RemoteError,
    open_port,
)
from tests.provision.ptys import DeviceThread, close_pair, pty_pair


class Device:
    """A tiny device: counts how often each op ran, keeps a transfer buffer."""

    def __init__(self) -> None:
        self.runs: dict[str, int] = {}
        self.buf = bytearray()
        self.expected = b""

    def request(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        self.runs[op] = self.runs.get(op, 0) + 1
        if op == "echo":
            return {"echo": args}
        if op == "install_begin":
            self.expected = bytes.fromhex(args["sha256"])
            return {"offset": len(self.buf)}
        if op == "done":
            return {"ok": hashlib.sha256(self.buf).digest() == self.expected}
        raise DeviceRefusal(ErrorCode.UNKNOWN_OP, f"no operation {op!r}")

    def data(self, offset: int, chunk: bytes) -> dict[str, Any]:
        if offset == len(self.buf):
            self.buf += chunk
        return {"next": len(self.buf)}


@pytest.fixture
def link() -> Iterator[tuple[Device, Any, DeviceThread]]:
    leader, path = pty_pair()
    dev = Device()
    thread = DeviceThread(leader, DeviceSession(dev.request, dev.data, hello_info={"agent": "test"}))
    with open_port(path) as port:
        yield dev, port, thread
    thread.close()
    close_pair(leader)


def test_hello_request_and_error(link: Any) -> None:
    _, port, _ = link
    host = HostSession(port)
    assert host.hello()["version"] == 1
    assert host.request("echo", {"x": 1}) == {"echo": {"x": 1}}
    with pytest.raises(RemoteError) as info:
        host.request("nope")
    assert info.value.code == ErrorCode.UNKNOWN_OP and "does not know this operation" in str(info.value)


def test_version_mismatch_is_named(link: Any) -> None:
    _, port, _ = link
    with pytest.raises(RemoteError) as info:
        HostSession(port).hello(versions=(7,))
    assert info.value.code == ErrorCode.VERSION
    assert "[1]" in info.value.message and "[7]" in info.value.message


def test_request_before_hello_is_refused(link: Any) -> None:
    _, port, _ = link
    with pytest.raises(RemoteError) as info:
        HostSession(port).request("echo")
    assert info.value.code == ErrorCode.VERSION


def test_transfer_progress_and_resume(link: Any) -> None:
    dev, port, _ = link
    host = HostSession(port)
    host.hello()
    data = os.urandom(50_000)
    seen: list[tuple[int, int]] = []
    dev.buf += data[:12_288]  # a previous, interrupted transfer
    host.send_file("m.edgepkg", data, progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (12_288, 50_000) and seen[-1] == (50_000, 50_000)
    assert host.request("done") == {"ok": True}


def test_repeated_request_is_answered_from_cache_not_rerun(link: Any) -> None:
    dev, port, _ = link
    host = HostSession(port)
    host.hello()
    host.request("echo", {"n": 1})
    # the same frame again (as after a lost answer): answered, not run twice
    port.write(encode_frame(MsgType.REQUEST, host.seq, b'{"op":"echo","args":{"n":1}}'))
    host.request("echo", {"n": 2})
    assert dev.runs["echo"] == 2


def test_no_answer_names_agent_and_baud() -> None:
    leader, path = pty_pair()
    try:
        with open_port(path) as port:
            host = HostSession(port, attempts=2)
            with pytest.raises(NoAnswerError) as info:
                host.hello()
        assert "no answer from device" in str(info.value) and "115200" in str(info.value)
        assert isinstance(info.value, ProvisionError)
    finally:
        close_pair(leader)


def test_missing_port_names_next_step() -> None:
    with pytest.raises(ProvisionError, match="provision ports"), open_port("/dev/ttyUSB-nope"):
        pass
