"""MQTT model commands through the real Deployer, Engine and encrypted store (no fakes): the store and
what serves move together, and a refused or failed command changes nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.config import ModelEntry
from edgert.device.commands import CommandProcessor
from edgert.device.deployer import Deployer
from edgert.device.handlers import daemon_handlers
from edgert.device.importing import import_plaintext
from edgert.device.sources import ModelSource
from edgert.engine import Engine
from edgert.metrics import Metrics
from edgert.mqtt.signing import sign_command
from edgert.runtime import Runtime
from edgert.security.loader import open_keystore, open_store
from tests.device.models_kit import MODELS, fails_at_run

NOW = 1_800_000_000.0
KEY = Ed25519PrivateKey.generate()


class Rig:
    """A store with digits 1, 2 (active), 3 (installed) and a broken 4; an engine serving 2."""

    def __init__(self, tmp: Path) -> None:
        state = tmp / "state"
        self.store = open_store(state, open_keystore(state, create=True))
        import_plaintext(self.store, MODELS / "digits_small_int8.onnx", name="digits", version="1")
        import_plaintext(self.store, MODELS / "digits_large_int8.onnx", name="digits", version="2")
        for version, path in (("3", MODELS / "digits_small_fp32.onnx"), ("4", fails_at_run(tmp / "b.onnx"))):
            import_plaintext(self.store, path, name="digits", version=version, activate=False)
        self.engine = Engine(Metrics())
        self.audit: list[tuple[str, dict[str, Any]]] = []
        self.deployer = Deployer(
            source=ModelSource(Runtime("cpu-generic"), lambda: self.store), target=self.engine,
            audit=lambda event, **fields: self.audit.append((event, fields)),
            models=lambda: (ModelEntry("digits"),))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.deployer.loop = self.loop
        self.deployer.run_threadsafe(self.deployer.boot([ModelEntry("digits")]))
        self.restarts: list[str] = []
        handlers = daemon_handlers(deployer=self.deployer, restart=lambda: self.restarts.append("x"),
                                   reboot_delay_s=0.01)
        self.proc = CommandProcessor("f1", "d1", KEY.public_key(), handlers=handlers)

    def send(self, cmd: str, **args: Any) -> dict[str, Any]:
        payload = sign_command(KEY, cmd=cmd, fleet="f1", device="d1", now=NOW, args=args)
        return self.proc.handle(payload, now=NOW)

    def state(self) -> tuple[str | None, str]:
        """(store active, served version)."""
        return self.store.entry("digits").active, self.engine.served_version("digits")

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.engine.close()
        self.loop.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def test_activate_serves_then_commits(rig: Rig) -> None:
    assert rig.state() == ("2", "2")
    reply = rig.send("activate-model", model="digits", version="3")
    assert reply["ok"], reply
    expected = {"model": "digits", "version": "3", "previous": "2", "changed": True}
    assert expected.items() <= reply["result"].items()
    assert rig.state() == ("3", "3")
    assert rig.store.entry("digits").previous == "2"


def test_activating_the_active_version_is_a_no_op(rig: Rig) -> None:
    reply = rig.send("activate-model", model="digits", version="2")
    assert reply["ok"] and reply["result"]["changed"] is False
    assert rig.state() == ("2", "2")


def test_downgrade_needs_the_flag_and_nothing_changes_when_refused(rig: Rig) -> None:
    refused = rig.send("activate-model", model="digits", version="1")
    assert refused["error"]["code"] == "failed" and "anti-rollback" in refused["error"]["message"]
    assert rig.state() == ("2", "2")
    ok = rig.send("activate-model", model="digits", version="1", allow_downgrade=True)
    assert ok["ok"] and rig.state() == ("1", "1")


def test_a_version_that_fails_its_health_check_changes_nothing(rig: Rig) -> None:
    reply = rig.send("activate-model", model="digits", version="4")
    assert reply["ok"] is False and reply["error"]["code"] == "failed"
    assert "warm-up of model 'digits' version '4' failed" in reply["error"]["message"]
    assert rig.state() == ("2", "2") and rig.store.entry("digits").previous == "1"
    failed = [f for e, f in rig.audit if e == "model_deploy_failed"]
    assert failed and failed[-1]["stage"] == "health" and failed[-1]["kept"] == "2"


def test_rollback_twice_returns_to_where_you_were(rig: Rig) -> None:
    reply = rig.send("rollback-model", model="digits")
    assert reply["ok"] and reply["result"]["version"] == "1" and reply["result"]["previous"] == "2"
    assert rig.state() == ("1", "1")
    again = rig.send("rollback-model", model="digits")
    assert again["ok"] and again["result"]["version"] == "2"
    assert rig.state() == ("2", "2") and rig.store.entry("digits").previous == "1"


def test_unknown_model_is_refused(rig: Rig) -> None:
    reply = rig.send("activate-model", model="nope", version="1")
    assert reply["ok"] is False and "not in the daemon config" in reply["error"]["message"]
    assert rig.state() == ("2", "2")


@pytest.mark.parametrize(
    "cmd,args",
    [
        ("activate-model", {"model": "digits"}),
        ("activate-model", {"model": 3, "version": "1"}),
        ("activate-model", {"model": "digits", "version": "3", "allow_downgrade": "yes"}),
        ("rollback-model", {}),
    ],
)
def test_bad_arguments_are_refused(rig: Rig, cmd: str, args: dict[str, Any]) -> None:
    reply = rig.send(cmd, **args)
    assert reply["ok"] is False and reply["error"]["code"] == "bad_args"
    assert rig.state() == ("2", "2")


def test_reboot_schedules_a_restart(rig: Rig) -> None:
    assert rig.restarts == []
    assert rig.send("reboot-daemon")["result"] == {"restarting": True, "delay_s": 0.01}
    deadline = time.monotonic() + 10
    while not rig.restarts and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rig.restarts == ["x"], "restart is requested after the reply"


def test_supervisor_restart_reloads_the_serving_version(rig: Rig) -> None:
    done = rig.deployer.run_threadsafe(rig.deployer.restart("digits"))
    assert done.changed and done.version == "2"
    assert rig.state() == ("2", "2")
    assert any(e == "model_deployed" and f["reason"] == "hung" for e, f in rig.audit)
