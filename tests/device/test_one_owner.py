"""Every entry point that changes what serves goes through the Deployer; the store and daemon never disagree.

A real ``edgert daemon`` subprocess (HTTP, Unix socket, MQTT to a real mosquitto) and the real CLI.
After every step, ``GET /v2/models/digits`` (what serves) is compared with ``edgert models list
--json`` (what the store calls active). The reproductions from issue 8 are steps of this walk:

* HTTP repository load of version 1 with 1 and 2 installed served 1 while the store said 2;
* ``models import`` said "active" while the daemon kept serving the old version;
* ``models activate`` of a version that fails at run moved the store first, so a restart exited.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgert.client import Client
from edgert.errors import RollbackError, UnknownModelError
from edgert.mqtt.signing import sign_command
from edgert.security.audit import read_records
from tests.brokers import Mosquitto
from tests.device.models_kit import MODELS, fails_at_run, flip_payload_byte
from tests.device.subproc import cli
from tests.mqtt.conftest import Recorder, require_mosquitto, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET, DEVICE = "f1", "dev-a"
READY_TIMEOUT_S = 60.0


class Device:
    """The daemon under test, its state, and the ways to reach it."""

    def __init__(self, tmp: Path, broker: Mosquitto, key: Ed25519PrivateKey) -> None:
        self.tmp, self.broker, self.key = tmp, broker, key
        self.state = tmp / "state"
        self.sock = tmp / "edgert.sock"
        self.config = tmp / "edgert.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor: Recorder | None = None
        self.http = ""

    def write_config(self, extra_model: str = "", *, broken_name: bool = False) -> None:
        pub = self.tmp / "fleet-cmd.pub"
        pub.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        other = '[[models]]\nname = "solo"\n' if broken_name else ""
        self.config.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{self.state}"
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{self.sock}"
mode = "0600"
[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
fleet = "{FLEET}"
device_id = "{DEVICE}"
command_key_file = "{pub}"
telemetry_interval = 0.5
reconnect_min = 0.1
reconnect_max = 1.0
spool_path = "{self.state / "spool.sqlite"}"
[[models]]
name = "digits"
{extra_model}
{other}""")

    def start(self) -> None:
        log = open(self.tmp / "daemon.log", "ab")  # a file: a full pipe would block the daemon
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, "daemon exited: " + self.log()[-3000:]
            try:
                with Client(f"unix://{self.sock}") as c:
                    if c.ready():
                        self.http = "http://" + c.status()["listeners"]["http"]
                        return
            except Exception:
                pass
            assert time.monotonic() < deadline, "daemon did not become ready"
            time.sleep(0.05)

    def stop(self) -> int:
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def log(self) -> str:
        return (self.tmp / "daemon.log").read_text(errors="replace")

    def served(self, name: str = "digits") -> str | None:
        """What serves, as an OIP client sees it (HTTP)."""
        with Client(self.http) as c:
            try:
                versions = c.metadata(name)["versions"]
            except UnknownModelError:
                return None
        assert len(versions) == 1, versions
        return str(versions[0])

    def store(self, name: str = "digits") -> dict[str, Any]:
        r = cli("models", "list", "--json", "--state-dir", str(self.state))
        assert r.returncode == 0, r.stderr
        return next(e for e in json.loads(r.stdout) if e["name"] == name)

    def agree(self, expected: str) -> None:
        """The daemon serves ``expected`` and the store calls exactly that version active."""
        served, active = self.served(), self.store()["active"]
        assert (served, active) == (expected, expected), f"daemon serves {served}, store says {active}"

    def command(self, cmd: str, corr: bytes, **args: Any) -> dict[str, Any]:
        assert self.monitor is not None
        payload = sign_command(self.key, cmd=cmd, fleet=FLEET, device=DEVICE, now=time.time(), args=args)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = corr
        topic = f"edgert/v1/{FLEET}/devices/{DEVICE}"
        self.monitor.publish(f"{topic}/cmd", payload, props)

        def reply() -> list[Any]:
            assert self.monitor is not None
            return [m for m in self.monitor.on("/reply") if m.properties.CorrelationData == corr]

        wait_for(lambda: bool(reply()), what=f"reply to {cmd}")
        return dict(json.loads(reply()[0].payload))


def _cli_ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout



@pytest.fixture
def device(tmp_path: Path) -> Any:
    require_mosquitto()
    broker = Mosquitto(tmp_path / "broker").start()
    dev = Device(tmp_path, broker, Ed25519PrivateKey.generate())
    dev.monitor = Recorder(broker.port, f"edgert/v1/{FLEET}/devices/{DEVICE}/#")
    try:
        yield dev
    finally:
        code = dev.stop()
        dev.monitor.close()
        broker.stop()
    assert code == 0, dev.log()[-3000:]


def test_every_entry_point_goes_through_the_deployer(device: Device) -> None:
    st = str(device.state)
    _cli_ok("keys", "init", "--state-dir", st)
    # No daemon yet: the CLI's offline Deployer loads and health-checks each version before it commits.
    out = _cli_ok("models", "import", str(MODELS / "digits_small_int8.onnx"), "--name", "digits",
                  "--version", "1", "--state-dir", st, "--socket", str(device.sock))
    assert "no daemon listening" in out and "passed its health check" in out
    _cli_ok("models", "import", str(MODELS / "digits_large_int8.onnx"), "--name", "digits", "--version", "2",
            "--state-dir", st, "--socket", str(device.sock))
    device.write_config()
    device.start()
    device.agree("2")

    # HTTP repository load below the anti-rollback floor: refused; before, the daemon served 1, store said 2
    with Client(device.http) as c, pytest.raises(RollbackError, match="anti-rollback"):
        c.load("digits", "1")
    device.agree("2")

    # CLI rollback and activate reach the daemon's Deployer, which commits the store
    out = _cli_ok("models", "rollback", "digits", "--config", str(device.config))
    assert f"the daemon at {device.sock} now serves digits 1" in out
    device.agree("1")
    _cli_ok("models", "activate", "digits", "2", "--config", str(device.config))
    device.agree("2")

    # import while the daemon runs: the daemon serves the new version (before: store "active", daemon old)
    out = _cli_ok("models", "import", str(MODELS / "digits_small_fp32.onnx"), "--name", "digits",
                  "--version", "3", "--config", str(device.config))
    assert "now serves digits 3" in out
    device.agree("3")

    # a version that loads but fails every run: installed, never active; the daemon keeps 3
    broken = fails_at_run(device.tmp / "digits_broken.onnx")
    r = cli("models", "import", str(broken), "--name", "digits", "--version", "4",
            "--config", str(device.config))
    assert r.returncode != 0
    assert "kept serving the previous version of digits; nothing changed" in r.stderr
    assert "warm-up" in r.stderr and "hint:" in r.stderr
    device.agree("3")
    assert "4" in device.store()["installed"]
    r = cli("models", "activate", "digits", "4", "--config", str(device.config))
    assert r.returncode != 0
    device.agree("3")

    # Unix socket: load of the broken version refused; unload, then load serves the store's active one
    with Client(f"unix://{device.sock}") as c:
        with pytest.raises(Exception, match="warm-up of model 'digits' version '4' failed"):
            c.load("digits", "4")
        c.unload("digits")
        assert "digits" not in c.models()
        c.load("digits")
    device.agree("3")

    # MQTT fleet commands
    reply = device.command("activate-model", b"a-1", model="digits", version="2", allow_downgrade=True)
    assert reply["ok"] is True and reply["result"]["version"] == "2", reply
    device.agree("2")
    reply = device.command("rollback-model", b"r-1", model="digits")
    assert reply["ok"] is True and reply["result"]["version"] == "3", reply
    device.agree("3")
    reply = device.command("activate-model", b"a-2", model="digits", version="4")
    assert reply["ok"] is False and "warm-up" in reply["error"]["message"], reply
    device.agree("3")
    reply = device.command("activate-model", b"a-3", model="digits", version="2")
    assert reply["ok"] is False and "anti-rollback" in reply["error"]["message"], reply
    device.agree("3")
    # the keep-3 policy pruned version 1 when 2 became active (active, previous and pending 4 stay)
    assert device.store()["installed"] == ["2", "3", "4"]
    reply = device.command("activate-model", b"a-4", model="digits", version="1", allow_downgrade=True)
    assert reply["ok"] is False and "no installed version '1'" in reply["error"]["message"], reply
    device.agree("3")

    # SIGHUP with changed model settings: redeployed through the Deployer, still 3
    device.write_config("max_batch_size = 8")
    assert device.proc is not None
    device.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: any(r["event"] == "config_reload" for r in read_records(device.state / "audit")),
             what="config_reload audit record")
    device.agree("3")
    x = np.load(MODELS / "digits_test.npz")["x"][:4]
    with Client(device.http) as c:
        assert c.infer("digits", {"pixels": x})["logits"].shape == (4, 10)

    # restart: the store never moved to the broken version, so the daemon comes back on 3
    assert device.stop() == 0
    device.start()
    device.agree("3")

    events = [r["event"] for r in read_records(device.state / "audit")]
    assert events.count("model_deploy_failed") >= 5, events
    assert "model_deployed" in events and "model_unload" in events
    # the fleet hears about deployments on the events channel
    assert device.monitor is not None
    wait_for(lambda: any(d.get("event") == "model_deployed" for d in device.monitor.json_on("/events")),
             what="model_deployed event over MQTT")


def test_boot_falls_back_and_a_model_without_a_servable_version_is_unready(device: Device) -> None:
    st = str(device.state)
    _cli_ok("keys", "init", "--state-dir", st)
    for version, model in (("1", "digits_small_int8.onnx"), ("2", "digits_large_int8.onnx")):
        _cli_ok("models", "import", str(MODELS / model), "--name", "digits", "--version", version,
                "--state-dir", st, "--socket", str(device.sock))
    _cli_ok("models", "import", str(MODELS / "digits_small_int8.onnx"), "--name", "solo", "--version", "1",
            "--state-dir", st, "--socket", str(device.sock))
    # the active packages are damaged on disk (a bad flash block): they no longer decrypt
    flip_payload_byte(device.state / "models" / "packages" / "digits" / "2.edgepkg")
    flip_payload_byte(device.state / "models" / "packages" / "solo" / "1.edgepkg")
    device.write_config(broken_name=True)
    device.start()  # before: the daemon exited; now it serves what it can
    device.agree("1")
    entry = device.store()
    assert entry["previous"] == "2" and "2" in entry["failed"], entry
    with Client(device.http) as c:
        status = c.status()
        assert status["models"]["solo"]["ready"] is False
        assert "integrity" in status["models"]["solo"]["error"]
        assert c.ready() is True and c.ready("digits") is True and c.ready("solo") is False
        with pytest.raises(UnknownModelError, match="configured but serves no version"):
            c.infer("solo", {"pixels": np.zeros((1, 64), np.float32)})
    events = [r["event"] for r in read_records(device.state / "audit")]
    assert "model_boot_fallback" in events and "model_unavailable" in events
    assert device.monitor is not None
    wait_for(lambda: any(d.get("event") == "model_boot_fallback" for d in device.monitor.json_on("/events")),
             what="model_boot_fallback event over MQTT")
