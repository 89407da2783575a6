"""Post-response polling ("linger"): on by default, bounded, and off with EDGERT_LINGER_US=0."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.config import parse_config
from edgert.serve import linger
from tests.serve.daemon_harness import config_text, start_daemon


def test_budget_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGERT_LINGER_US", raising=False)
    assert linger._budget_ns() == linger.DEFAULT_LINGER_US * 1000
    monkeypatch.setenv("EDGERT_LINGER_US", "0")
    assert linger._budget_ns() == 0
    monkeypatch.setenv("EDGERT_LINGER_US", "nonsense")
    assert linger._budget_ns() == linger.DEFAULT_LINGER_US * 1000
    monkeypatch.setenv("EDGERT_LINGER_US", "-5")
    assert linger._budget_ns() == 0


class _CountingLinger(linger.Linger):
    __slots__ = ("polls",)

    def _poll(self) -> None:
        self.polls += 1
        super()._poll()


def test_linger_polls_then_stops_by_itself() -> None:
    async def scenario() -> tuple[bool, bool, int]:
        lg = _CountingLinger(asyncio.get_running_loop(), budget_ns=2_000_000)  # 2 ms
        lg.polls = 0
        lg.touch()
        active_after_touch = lg.active
        await asyncio.sleep(0.05)  # far beyond the budget
        return active_after_touch, lg.active, lg.polls

    active_after_touch, active_later, polls = asyncio.run(scenario())
    assert active_after_touch is True
    assert active_later is False  # it never spins past its budget
    assert polls >= 1


def test_zero_budget_never_schedules() -> None:
    async def scenario() -> bool:
        lg = linger.Linger(asyncio.get_running_loop(), budget_ns=0)
        lg.touch()
        return lg.active

    assert asyncio.run(scenario()) is False


@pytest.mark.parametrize("linger_us", ["0", "250"])
def test_daemon_serves_with_and_without_linger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linger_us: str, digits
) -> None:
    monkeypatch.setenv("EDGERT_LINGER_US", linger_us)
    running = start_daemon(parse_config(config_text(tmp_path), "test"))
    try:
        x, y = digits
        for spin in (0, 250):
            for url in (f"unix://{running.socket}", running.http_url):
                with Client(url, spin_us=spin) as c:
                    got = [c.infer("digits-large", {"pixels": x[i : i + 1]})["logits"] for i in range(20)]
                assert (np.concatenate(got).argmax(1) == y[:20]).mean() >= 0.9
    finally:
        running.stop()
