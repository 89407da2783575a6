"""MemoryKeeper's bookkeeping with a fake Deployer (pure logic): leases keep busy models loaded, a load
that only busy models could make room for waits for one to go idle, then gives up with Retry-After."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from edgert.config import ModelEntry
from edgert.device import lazy
from edgert.device.budget import MIB
from edgert.device.lazy import MemoryKeeper
from edgert.errors import OverloadedError, UnknownModelError

SIZE = 3 * MIB  # each model's decrypted size: its footprint is at least this


class _Model:
    inputs: list[Any] = []

    def run(self, inputs: Any) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass


class FakeDeployer:
    """The parts of the Deployer the keeper calls; deploy() takes the keeper's measured load path."""

    def __init__(self, names: list[str], budget: int) -> None:
        self.models = [ModelEntry(name=n, load="lazy") for n in names]
        self.unavailable: dict[str, Any] = {}
        self.source = SimpleNamespace(size_hint=lambda entry, version: SIZE,
                                      runtime=SimpleNamespace(load=lambda data, **kw: _Model()),
                                      resolve_version=lambda entry, version: "1")
        self.served: set[str] = set()
        self.unloaded: list[str] = []
        self.loads: list[str] = []
        self.memory = MemoryKeeper(self, budget)  # type: ignore[arg-type]

    def entry(self, name: str) -> ModelEntry:
        for m in self.models:
            if m.name == name:
                return m
        raise UnknownModelError(name)

    def entries(self) -> list[ModelEntry]:
        return self.models

    def cascade_entries(self) -> list[Any]:
        return []

    def serving(self, name: str) -> bool:
        return name in self.served

    def deploying(self, name: str) -> bool:
        return False

    def unload_for_room(self, name: str) -> None:
        self.served.discard(name)
        self.unloaded.append(name)

    def mark_unavailable(self, entry: ModelEntry, version: str | None, exc: BaseException) -> None:
        self.unavailable[entry.name] = exc

    async def deploy(self, name: str, version: str | None, **kw: Any) -> None:
        async def load(entry: ModelEntry, version: str) -> tuple[Any, str, str]:
            self.loads.append(entry.name)
            return _Model(), "fp32", "test"

        try:
            await self.memory.measured_load(self.entry(name), "1", load)
        except BaseException:
            self.memory.settled(name, ok=False)
            raise
        self.served.add(name)
        self.memory.settled(name, ok=True)


def test_a_load_waits_for_a_busy_model_to_go_idle_then_unloads_it() -> None:
    async def scenario() -> None:
        d = FakeDeployer(["a", "b", "c"], budget=7 * MIB)  # two fit
        d.memory.before_boot([], "test.toml")
        assert await d.memory.acquire("a") and await d.memory.acquire("b")  # both held by a request
        waiting = asyncio.ensure_future(d.memory.acquire("c"))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not waiting.done() and d.unloaded == []  # busy models are never unloaded
        d.memory.release("a")
        assert await asyncio.wait_for(waiting, 10) > 0  # c loaded once a went idle; it reports a cold load
        assert d.unloaded == ["a"] and d.served == {"b", "c"} and d.loads == ["a", "b", "c"]
        assert d.memory.lazy_names() == ["a"]  # a loads again on its next request

    asyncio.run(scenario())


def test_no_room_while_every_model_is_busy_fails_the_request_with_retry_after(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lazy, "ROOM_WAIT_TIMEOUT_S", 0.05)

    async def scenario() -> None:
        d = FakeDeployer(["a", "b", "c"], budget=7 * MIB)
        d.memory.before_boot([], "test.toml")
        await d.memory.acquire("a")
        await d.memory.acquire("b")
        with pytest.raises(OverloadedError) as info:
            await d.memory.acquire("c")
        assert info.value.retry_after and "held by pinned or busy models" in info.value.message
        assert "c" not in d.unavailable and d.served == {"a", "b"}  # a busy budget is not a failed model
        d.memory.release("a")
        assert await d.memory.acquire("c") > 0  # and the next request loads it

    asyncio.run(scenario())


def test_concurrent_requests_share_one_load() -> None:
    async def scenario() -> None:
        d = FakeDeployer(["a"], budget=7 * MIB)
        d.memory.before_boot([], "test.toml")
        waits = await asyncio.gather(*(d.memory.acquire("a") for _ in range(10)))
        assert d.loads == ["a"] and all(w is not None and w > 0 for w in waits)
        assert await d.memory.acquire("a") == 0.0  # loaded now: warm

    asyncio.run(scenario())


def test_a_model_the_engine_will_not_unload_is_skipped_and_treated_as_pinned() -> None:
    from edgert.errors import ConfigError

    async def scenario() -> None:
        d = FakeDeployer(["a", "b", "c"], budget=7 * MIB)
        d.memory.before_boot([], "test.toml")
        for name in ("a", "b"):
            await d.memory.acquire(name)
            d.memory.release(name)
        unload = d.unload_for_room

        def refuse_a(name: str) -> None:
            if name == "a":  # as the engine does for a member of a cascade or pipeline
                raise ConfigError("model 'a' is used by pipeline(s) ['p']")
            unload(name)

        d.unload_for_room = refuse_a  # type: ignore[method-assign]
        assert await d.memory.acquire("c") > 0
        assert d.unloaded == ["b"] and d.served == {"a", "c"} and "c" not in d.unavailable

    asyncio.run(scenario())
