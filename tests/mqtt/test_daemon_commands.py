"""Pure logic of the daemon-backed command handlers (fakes for the engine and the store)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.device.commands import CommandProcessor
from edgert.device.handlers import daemon_handlers
from edgert.errors import ModelError, RollbackError
from edgert.mqtt.signing import sign_command

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()


class FakeStore:
    """active/previous per model with anti-rollback, like ModelStore."""

    def __init__(self) -> None:
        self.active, self.previous, self.installed = "2", "1", {"1", "2", "3"}
        self.highest = "2"

    def activate(self, name: str, version: str, *, allow_downgrade: bool = False) -> None:
        if version not in self.installed:
            raise ModelError(f"model {name!r} has no installed version {version!r}")
        if version < self.highest and not allow_downgrade:
            raise RollbackError(f"refusing to activate {name} {version}: {self.highest} was installed")
        if version != self.active:
            self.previous, self.active = self.active, version
        self.highest = max(self.highest, version)

    def rollback(self, name: str) -> str:
        self.active, self.previous = self.previous, self.active
        return self.active


class FakeModels:
    def __init__(self, store: FakeStore, broken: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.serving = store.active
        self.broken = broken

    def served_version(self, name: str) -> str | None:
        return self.serving if name == "digits" else None

    def swap(self, name: str, version: str) -> None:
        if version in self.broken:
            raise ModelError(f"integrity check failed for {name} {version}")
        self.serving = version


def _setup(broken: set[str] = frozenset()) -> tuple[CommandProcessor, FakeStore, FakeModels, list[str]]:  # type: ignore[assignment]
    store = FakeStore()
    models = FakeModels(store, broken)
    restarts: list[str] = []

    @contextmanager
    def open_store() -> Iterator[FakeStore]:
        yield store

    handlers = daemon_handlers(
        models=models, open_store=open_store, restart=lambda: restarts.append("x"), reboot_delay_s=0.01
    )
    return CommandProcessor("f1", "d1", KEY.public_key(), handlers=handlers), store, models, restarts


def _send(proc: CommandProcessor, cmd: str, **args: Any) -> dict[str, Any]:
    return proc.handle(sign_command(KEY, cmd=cmd, fleet="f1", device="d1", now=NOW, args=args), now=NOW)


def test_activate_changes_store_then_daemon() -> None:
    proc, store, models, _ = _setup()
    reply = _send(proc, "activate-model", model="digits", version="3")
    assert reply["ok"] and reply["result"] == {"model": "digits", "version": "3", "previous": "2"}
    assert (store.active, models.serving) == ("3", "3")


def test_activate_downgrade_needs_the_flag_and_nothing_changes_when_refused() -> None:
    proc, store, models, _ = _setup()
    refused = _send(proc, "activate-model", model="digits", version="1")
    assert refused["error"]["code"] == "failed" and "refusing" in refused["error"]["message"]
    assert (store.active, models.serving) == ("2", "2")
    ok = _send(proc, "activate-model", model="digits", version="1", allow_downgrade=True)
    assert ok["ok"] and (store.active, models.serving) == ("1", "1")


def test_failed_swap_puts_the_store_back() -> None:
    proc, store, models, _ = _setup(broken={"3"})
    reply = _send(proc, "activate-model", model="digits", version="3")
    assert reply["ok"] is False and reply["error"]["code"] == "failed"
    assert "integrity" in reply["error"]["message"]
    assert (store.active, models.serving) == ("2", "2")


def test_rollback_and_failed_rollback() -> None:
    proc, store, models, _ = _setup()
    reply = _send(proc, "rollback-model", model="digits")
    assert reply["result"] == {"model": "digits", "version": "1", "previous": "2"}
    assert (store.active, models.serving) == ("1", "1")
    proc, store, models, _ = _setup(broken={"1"})
    reply = _send(proc, "rollback-model", model="digits")
    assert reply["ok"] is False and (store.active, store.previous, models.serving) == ("2", "1", "2")


@pytest.mark.parametrize(
    "cmd,args",
    [
        ("activate-model", {"model": "digits"}),
        ("activate-model", {"model": 3, "version": "1"}),
        ("activate-model", {"model": "digits", "version": "3", "allow_downgrade": "yes"}),
        ("rollback-model", {}),
    ],
)
def test_bad_arguments_are_refused(cmd: str, args: dict[str, Any]) -> None:
    proc, store, models, _ = _setup()
    reply = _send(proc, cmd, **args)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_args"
    assert (store.active, models.serving) == ("2", "2")


def test_reboot_schedules_a_restart() -> None:
    proc, _, _, restarts = _setup()
    assert restarts == []
    assert _send(proc, "reboot-daemon")["result"] == {"restarting": True, "delay_s": 0.01}
    deadline = time.monotonic() + 10
    while not restarts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert restarts == ["x"], "restart is requested after the reply"
