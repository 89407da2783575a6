"""Issue 11 "done when": fleet init → model add → serve → deploy, end to end.

Real processes only: mosquitto, `edgert fleet serve` (controller + repository over MQTT), and two real
`edgert daemon` devices whose keys were made on the device. The devices fetch TUF metadata and the
signed package over MQTT, install it through the Deployer and serve the new version; the fleet's
status shows them. A device that joined the group after `model add` installs with a key record.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgert.client import Client
from tests.brokers import Mosquitto
from tests.device.models_kit import MODELS
from tests.device.subproc import cli
from tests.mqtt.conftest import require_mosquitto, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET, GROUP = "acme", "lab"
ROOT = Path(__file__).resolve().parents[2]
#: Simulated devices beside the two real daemons (issue 11: "real daemons plus simulated devices").
SIMULATED = 6
READY_TIMEOUT_S = 60.0
UPDATE_TIMEOUT_S = 90.0


def _ok(*args: str) -> str:
    r = cli(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


class Device:
    """A device with its own keys, a local model v1, and a daemon that follows the fleet."""

    def __init__(self, tmp: Path, name: str, fleet: Path, broker_port: int) -> None:
        self.name, self.dir = name, tmp / name
        self.state, self.sock = self.dir / "state", self.dir / "edgert.sock"
        self.config = self.dir / "edgert.toml"
        self.proc: subprocess.Popen[bytes] | None = None
        st = str(self.state)
        _ok("keys", "init", "--state-dir", st)
        keys = json.loads(_ok("keys", "show", "--json", "--state-dir", st))
        self.x25519 = keys["wrap_public_key"]
        _ok("models", "import", str(MODELS / "digits_small_int8.onnx"), "--name", "digits", "--version", "1",
            "--state-dir", st, "--socket", str(self.sock))
        # What provisioning installs: the fleet's TUF root, command key and publisher key.
        (self.state / "tuf").mkdir(mode=0o700)
        shutil.copy(fleet / "repository" / "metadata" / "1.root.json", self.state / "tuf" / "root.json")
        publisher = (fleet / "public" / "publisher.pub").read_text().strip()
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
[security]
trusted_publishers = ["{publisher}"]
[mqtt]
host = "127.0.0.1"
port = {broker_port}
fleet = "{FLEET}"
device_id = "{name}"
group = "{GROUP}"
command_key_file = "{fleet / "public" / "command.pub.pem"}"
telemetry_interval = 0.5
reconnect_min = 0.1
reconnect_max = 1.0
[[models]]
name = "digits"
""")

    def start(self) -> None:
        log = open(self.dir / "daemon.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "--config",
                                      str(self.config)], stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.log()[-3000:]
            try:
                with Client(f"unix://{self.sock}") as c:
                    if c.ready():
                        return
            except Exception:
                pass
            assert time.monotonic() < deadline, "daemon did not become ready"
            time.sleep(0.05)

    def served(self) -> str | None:
        try:
            with Client(f"unix://{self.sock}") as c:
                return str(c.metadata("digits")["versions"][0])
        except Exception:
            return None

    def store_active(self) -> str:
        listed = json.loads(_ok("models", "list", "--json", "--state-dir", str(self.state),
                                "--socket", str(self.sock)))
        return str(next(e for e in listed if e["name"] == "digits")["active"])

    def log(self) -> str:
        return (self.dir / "daemon.log").read_text(errors="replace")

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


@pytest.fixture
def rig(tmp_path: Path) -> Any:
    require_mosquitto()
    broker = Mosquitto(tmp_path / "broker").start()
    fleet = tmp_path / "fleet"
    procs: list[Any] = []
    try:
        yield tmp_path, broker, fleet, procs
    finally:
        for p in procs:
            if isinstance(p, Device):
                p.stop()
            elif p.poll() is None:
                p.send_signal(signal.SIGINT)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
        broker.stop()


def test_fleet_init_model_add_serve_deploy(rig: Any) -> None:
    tmp, broker, fleet, procs = rig
    _ok("fleet", "init", str(fleet), "--id", FLEET, "--broker-port", str(broker.port))
    devices = [Device(tmp, f"dev-{i}", fleet, broker.port) for i in (1, 2)]
    _ok("fleet", "devices", "add", "dev-1", "--fleet", str(fleet), "--groups", GROUP,
        "--x25519", devices[0].x25519)
    # v2 is wrapped for dev-1 only; dev-2 joins the group later and gets a key record on demand
    _ok("fleet", "model", "add", str(MODELS / "digits_large_int8.onnx"),
        str(MODELS / "digits_large_fp32.onnx"), "--fleet", str(fleet), "--name", "digits", "--version", "2",
        "--groups", GROUP)
    _ok("fleet", "devices", "add", "dev-2", "--fleet", str(fleet), "--groups", GROUP,
        "--x25519", devices[1].x25519)
    for d in devices:
        procs.append(d)
        d.start()
        assert d.served() == "1"
    log = open(tmp / "controller.log", "ab")
    controller = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "fleet", "serve", "--fleet",
                                   str(fleet)], stdout=subprocess.DEVNULL, stderr=log,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    procs.append(controller)
    # simulated devices join the same group (tools/fleet_sim.py: the real sync, updater and Deployer each)
    sim_log = open(tmp / "sim.log", "ab")
    sim = subprocess.Popen([sys.executable, str(ROOT / "tools" / "fleet_sim.py"), "--devices", str(SIMULATED),
                            "--procs", "1", "--fleet", str(fleet), "--broker", f"127.0.0.1:{broker.port}",
                            "--group", GROUP, "--work-dir", str(tmp / "sim"), "--no-rollout"],
                           stdout=subprocess.DEVNULL, stderr=sim_log)
    sim_log.close()
    procs.append(sim)
    # the controller sees every device's retained status before the rollout starts
    def all_seen() -> bool:
        assert sim.poll() is None, (tmp / "sim.log").read_text(errors="replace")[-3000:]
        seen = json.loads(_ok("fleet", "status", "--fleet", str(fleet), "--json"))["devices"]
        return len(seen) >= 2 + SIMULATED

    wait_for(all_seen, timeout=READY_TIMEOUT_S * 2, what="every device in the fleet status")
    out = _ok("fleet", "deploy", "--fleet", str(fleet), "--group", GROUP, "--model", "digits",
              "--version", "2", "--waves", "50%,100%", "--wait-healthy", "60s", "--max-failure-rate", "0%",
              "--json")
    rollout = json.loads(out)
    assert rollout["devices"] == 2 + SIMULATED and rollout["version"] == "2", rollout

    def updated() -> bool:
        assert controller.poll() is None, (tmp / "controller.log").read_text()[-3000:]
        return all(d.served() == "2" for d in devices)

    wait_for(updated, timeout=UPDATE_TIMEOUT_S, what="both devices serving digits 2")
    for d in devices:
        assert d.store_active() == "2"  # the Deployer committed the store after the swap

    def report() -> dict[str, Any]:
        return dict(json.loads(_ok("fleet", "status", "--fleet", str(fleet), "--json")))

    wait_for(lambda: report()["rollouts"][0]["state"] == "complete", timeout=UPDATE_TIMEOUT_S,
             what="rollout complete")
    status = report()
    waves = status["rollouts"][0]["waves"]
    assert len(waves) == 2 and sum(w["devices"] for w in waves) == 2 + SIMULATED
    assert all(w["active"] == w["devices"] and w["failed"] == 0 for w in waves)
    assert set(status["devices"]) >= {"dev-1", "dev-2"} and len(status["devices"]) == 2 + SIMULATED
    logs = [json.loads(line) for d in devices for line in d.log().splitlines() if line.startswith("{")]
    assert any(r.get("msg") == "model deployed" for r in logs)  # the JSON log lines are read
    errors = [r for r in logs if r.get("level") == "error"]
    assert not errors, errors[:5]


def test_a_device_killed_during_its_update_resumes_and_never_serves_half_an_install(rig: Any) -> None:
    """SIGKILL at several points of an update (TUF refresh, download, install, deploy): after each restart
    the daemon serves a whole version and the store agrees; in the end it serves the new one."""
    tmp, broker, fleet, procs = rig
    _ok("fleet", "init", str(fleet), "--id", FLEET, "--broker-port", str(broker.port))
    device = Device(tmp, "dev-k", fleet, broker.port)
    _ok("fleet", "devices", "add", "dev-k", "--fleet", str(fleet), "--groups", GROUP,
        "--x25519", device.x25519)
    _ok("fleet", "model", "add", str(MODELS / "digits_large_fp32.onnx"), "--fleet", str(fleet), "--name",
        "digits", "--version", "2", "--groups", GROUP)  # ~10 chunks of 64 KiB to be killed in
    procs.append(device)
    device.start()
    log = open(tmp / "controller.log", "ab")
    controller = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "fleet", "serve", "--fleet",
                                   str(fleet)], stdout=subprocess.DEVNULL, stderr=log)
    log.close()
    procs.append(controller)
    wait_for(lambda: len(json.loads(_ok("fleet", "status", "--fleet", str(fleet), "--json"))["devices"]) >= 1,
             timeout=READY_TIMEOUT_S, what="the device in the fleet status")
    _ok("fleet", "deploy", "--fleet", str(fleet), "--group", GROUP, "--model", "digits", "--version", "2",
        "--waves", "100%", "--wait-healthy", "120s")
    kills = 0
    for delay in (0.2, 0.5, 0.9, 1.4):
        time.sleep(delay)
        if device.served() == "2":
            break
        assert device.proc is not None
        device.proc.kill()  # SIGKILL: no drain, no cleanup
        device.proc.wait(30)
        device.proc = None
        kills += 1
        device.start()  # serves a whole version at once (never a half-installed one)
        served = device.served()
        assert served in ("1", "2")
        # the resumed update may commit 2 between these reads (it runs as soon as the daemon is ready):
        # the store names what served just before or just after, never anything else
        active, served_after = device.store_active(), device.served()
        assert active in (served, served_after), (served, active, served_after)
    assert kills >= 1
    wait_for(lambda: device.served() == "2", timeout=UPDATE_TIMEOUT_S, what="the device to finish the update")
    assert device.store_active() == "2"


def test_a_device_updates_from_a_static_http_copy_of_the_repository(rig: Any) -> None:
    """The second route (issue 11 item 3): the fleet's repository directory behind any static HTTP server
    (here Python's http.server, as a CDN or bucket would be); the device's `repository_url` points at it.
    TUF checks the same signatures; the desired state still comes over MQTT."""
    import functools
    import http.server
    import threading

    tmp, broker, fleet, procs = rig
    _ok("fleet", "init", str(fleet), "--id", FLEET, "--broker-port", str(broker.port))
    device = Device(tmp, "dev-h", fleet, broker.port)
    served_paths: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            served_paths.append(self.path)

    handler = functools.partial(Handler, directory=str(fleet / "repository"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        device.config.write_text(device.config.read_text().replace(
            "[[models]]", f'repository_url = "{url}"\n[[models]]', 1))
        _ok("fleet", "devices", "add", "dev-h", "--fleet", str(fleet), "--groups", GROUP,
            "--x25519", device.x25519)
        _ok("fleet", "model", "add", str(MODELS / "digits_large_int8.onnx"), "--fleet", str(fleet),
            "--name", "digits", "--version", "2", "--groups", GROUP)
        procs.append(device)
        device.start()
        log = open(tmp / "controller.log", "ab")
        controller = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "fleet", "serve", "--fleet",
                                       str(fleet)], stdout=subprocess.DEVNULL, stderr=log)
        log.close()
        procs.append(controller)
        wait_for(lambda: len(json.loads(_ok("fleet", "status", "--fleet", str(fleet), "--json"))["devices"])
                 >= 1, timeout=READY_TIMEOUT_S, what="the device in the fleet status")
        _ok("fleet", "deploy", "--fleet", str(fleet), "--group", GROUP, "--model", "digits",
            "--version", "2", "--waves", "100%", "--wait-healthy", "60s")
        wait_for(lambda: device.served() == "2", timeout=UPDATE_TIMEOUT_S, what="the device to serve 2")
        assert device.store_active() == "2"
        # metadata and the package came from the HTTP server
        assert any(p.startswith("/metadata/") for p in served_paths), served_paths
        assert any(p.startswith("/targets/models/digits/") for p in served_paths), served_paths
    finally:
        server.shutdown()
        server.server_close()
