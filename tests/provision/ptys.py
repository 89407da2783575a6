"""Real pseudo-terminal pairs, a device-side session loop in a thread, and a fault-injecting proxy."""

from __future__ import annotations

import os
import random
import select
import threading
import time
import tty
from dataclasses import dataclass, field

from edgert.provision.session import DeviceSession

_HELD: dict[int, int] = {}


def pty_pair() -> tuple[int, str]:
    """(leader fd, follower path) with the follower in raw mode (what a USB-serial line gives).

    A follower fd stays open (closed by :func:`close_pair`): otherwise the leader sees a hang-up
    between one opener closing and the next opening, and Linux drops or errors on what is in flight.
    """
    leader, follower = os.openpty()
    tty.setraw(follower)
    _HELD[leader] = follower
    return leader, os.ttyname(follower)


def close_pair(leader: int) -> None:
    """Close a pair made by :func:`pty_pair`."""
    follower = _HELD.pop(leader, None)
    if follower is not None:
        os.close(follower)
    os.close(leader)


class DeviceThread:
    """Serve a :class:`DeviceSession` on a pty leader fd until stopped."""

    def __init__(self, fd: int, session: DeviceSession) -> None:
        self.fd, self.session = fd, session
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                time.sleep(0.01)
                continue
            out = self.session.receive(data)
            if out:
                os.write(self.fd, out)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


@dataclass
class Faults:
    """What the proxy does to each byte it forwards (probabilities), and its pacing."""

    drop: float = 0.0
    duplicate: float = 0.0
    corrupt: float = 0.0
    delay_s: float = 0.0
    delay_p: float = 0.0
    bytes_per_s: float = 0.0  # 0 = no pacing; 11520 = 115200 baud 8N1
    seed: int = 1
    counts: dict[str, int] = field(default_factory=lambda: {"drop": 0, "dup": 0, "corrupt": 0, "bytes": 0})


class FaultProxy:
    """Forward bytes between two pty leaders, injecting faults (both directions)."""

    def __init__(self, a: int, b: int, faults: Faults) -> None:
        self.a, self.b, self.f = a, b, faults
        self.rng = random.Random(faults.seed)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _mangle(self, data: bytes) -> bytes:
        f, out = self.f, bytearray()
        for byte in data:
            r = self.rng.random()
            if r < f.drop:
                f.counts["drop"] += 1
                continue
            if r < f.drop + f.corrupt:
                f.counts["corrupt"] += 1
                byte ^= 1 << self.rng.randrange(8)
            out.append(byte)
            if self.rng.random() < f.duplicate:
                f.counts["dup"] += 1
                out.append(byte)
        return bytes(out)

    def _run(self) -> None:
        while not self.stop.is_set():
            r, _, _ = select.select([self.a, self.b], [], [], 0.05)
            for src in r:
                dst = self.b if src == self.a else self.a
                try:
                    data = os.read(src, 65536)
                except OSError:
                    time.sleep(0.01)
                    continue
                data = self._mangle(data)
                self.f.counts["bytes"] += len(data)
                if self.f.delay_p and self.rng.random() < self.f.delay_p:
                    time.sleep(self.f.delay_s)
                if self.f.bytes_per_s:
                    time.sleep(len(data) / self.f.bytes_per_s)
                try:
                    os.write(dst, data)
                except OSError:
                    pass

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
