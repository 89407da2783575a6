"""Issue 12's "done when": a fresh device goes from ``info`` to enrolled and reporting telemetry with one
technician command, over a real pty.

Real processes only: a two-listener mosquitto (mutual TLS for devices against the fleet CA, passwords
for the claim; edgert.provision.broker_conf), the fleet controller (``edgert fleet serve``, answering
enrollment), the device agent (``edgert provision agent``, the fleet key pinned) on one end of a pty
link paced at 115200 baud, the technician's ``edgert provision device`` on the other, and then the
device's ``edgert daemon`` on the config the agent wrote. The fleet side reads the telemetry with
``mosquitto_sub`` as the controller's identity, over mutual TLS.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgert.client import Client
from tests.mqtt.conftest import Recorder, require_mosquitto, wait_for
from tests.provision.ptys import Faults
from tests.provision.site import FLEET, Link, Site, make_site

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEVICE = "gw-42"
TOPIC = f"edgert/v1/{FLEET}/devices/{DEVICE}"
READY_TIMEOUT_S = 60.0
SUB_TIMEOUT_S = 30
#: 115200 baud, 8N1: 11520 bytes/s on the wire.
LINE_BYTES_PER_S = 11520.0


def _edgert(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgert.cli.main", *args]


def _stop(proc: subprocess.Popen[Any] | None) -> int | None:
    """SIGTERM, then SIGKILL, by PID; the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(30)


def _wait_controller_answers(site: Site) -> None:
    """Ask the controller about an unknown claim until it answers (it is subscribed from then on)."""
    answered = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=MQTTProtocolVersion.MQTTv5)
    ca, cert, key = site.pki.controller_tls
    c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key))
    c.on_message = lambda *a: answered.set()
    subscribed = threading.Event()
    c.on_subscribe = lambda *a: subscribed.set()
    c.connect("127.0.0.1", site.broker.port)
    c.loop_start()
    try:
        c.subscribe(f"edgert/v1/{FLEET}/enroll/claim-probe/reply", qos=1)
        assert subscribed.wait(20)
        probe = {"v": 1, "nonce": "p", "device": "probe", "groups": ["default"], "csr": "-", "x25519": "-"}
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not answered.is_set():
            assert time.monotonic() < deadline, "the fleet controller never answered enrollment"
            c.publish(f"edgert/v1/{FLEET}/enroll/claim-probe/request", json.dumps({**probe, "secret": "-"}))
            answered.wait(1.0)
    finally:
        c.disconnect()
        c.loop_stop()


def _claim_tries_device_topic(site: Site, marker: bytes) -> None:
    """The bundle's claim (still on the technician's laptop) publishes as the device: the ACL must drop it."""
    connected = threading.Event()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="claim-abuse", protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set(site.bundle.claim_id, site.bundle.claim_secret)
    c.tls_set(ca_certs=str(site.pki.ca_path))
    c.on_connect = lambda c_, u, f, rc, p: connected.set() if not rc.is_failure else None
    c.connect("127.0.0.1", site.broker.claim_port)
    c.loop_start()
    try:
        assert connected.wait(20), "the claim listener refused the claim itself"
        info = c.publish(f"{TOPIC}/telemetry", marker, qos=1)
        try:
            info.wait_for_publish(10)
        except RuntimeError:  # mosquitto may drop a client that breaks its ACL
            pass
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    require_mosquitto()
    s = make_site(tmp_path, telemetry_interval=0.5, controller=False)
    yield s
    s.close()


def test_one_command_takes_a_fresh_device_to_reporting_telemetry(site: Site, tmp_path: Path) -> None:
    state, config = tmp_path / "device" / "state", tmp_path / "device" / "etc" / "edgert.toml"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: dict[str, subprocess.Popen[Any]] = {}
    files: list[Any] = []

    def log(name: str) -> Any:
        files.append(open(logs / f"{name}.log", "wb"))  # a file, not a pipe: a full pipe would block
        return files[-1]

    link = Link(Faults(bytes_per_s=LINE_BYTES_PER_S))
    watcher = Recorder(site.broker.port, f"{TOPIC}/#", tls=site.pki.controller_tls)
    try:
        procs["controller"] = subprocess.Popen(
            _edgert("fleet", "serve", "--fleet", str(site.fleet.path)),
            stdout=subprocess.DEVNULL, stderr=log("controller"),
        )  # fmt: skip
        _wait_controller_answers(site)
        procs["agent"] = subprocess.Popen(
            _edgert("provision", "agent", "--port", link.device_path, "--state-dir", str(state),
                    "--config", str(config), "--profile", "cpu-generic", "--fleet-key", site.fleet_key),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert procs["agent"].stderr is not None
        assert b"agent ready" in procs["agent"].stderr.readline()

        # -- the technician's one command -------------------------------------------------------
        info = subprocess.run(
            _edgert("provision", "info", "--port", link.host_path, "--json"),
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["provisioned"] is False
        assert json.loads(info.stdout)["fleet_key"] is not None  # the image pins the fleet key
        run = subprocess.run(
            _edgert("provision", "device", "--port", link.host_path, "--bundle", str(site.bundle_path),
                    "--fleet-key", site.fleet_key, "--device-id", DEVICE),
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout + run.stderr
        for step in ("hello", "info", "keys", "configure", "enroll", "selftest", "finish"):
            assert f"  {step:<10} ... ok" in run.stderr, run.stderr
        assert f"device id         {DEVICE}" in run.stdout
        assert "broker reachable  yes (device certificate)" in run.stdout, run.stdout
        assert "certificate       not enrolled yet" not in run.stdout
        assert procs["agent"].wait(READY_TIMEOUT_S) == 0  # provisioned: the agent is done

        # the claim is gone from the device, and the claim cannot act as the device
        assert not (state / "provision" / "claim.json").exists()
        assert site.bundle.claim_secret not in config.read_text()
        marker = b'{"v":1,"forged":"by the claim"}'
        _claim_tries_device_topic(site, marker)

        # -- the device's daemon on the config the agent wrote --------------------------------------
        # Only test-local addition: no Prometheus listener (its default port may be taken by parallel
        # runs); the HTTP listener and the socket are moved with the daemon's own flags.
        with config.open("a") as f:
            f.write('\n[metrics]\nlisten = ""\n')
        sock = tmp_path / "edgert.sock"
        procs["daemon"] = subprocess.Popen(
            _edgert("daemon", "--config", str(config), "--http", "", "--socket", str(sock)),
            stdout=subprocess.DEVNULL, stderr=log("daemon"),
        )  # fmt: skip

        def daemon_ready() -> bool:
            assert procs["daemon"].poll() is None, (logs / "daemon.log").read_text()[-3000:]
            try:
                with Client(f"unix://{sock}") as c:
                    return c.ready()
            except Exception:
                return False

        wait_for(daemon_ready, timeout=READY_TIMEOUT_S, what="the daemon to be ready")
        # the fleet side, as the controller's identity over mutual TLS, with the real mosquitto_sub
        ca, cert, key = site.pki.controller_tls
        sub = subprocess.run(
            ["mosquitto_sub", "-h", "localhost", "-p", str(site.broker.port), "-V", "mqttv5",
             "--cafile", str(ca), "--cert", str(cert), "--key", str(key), "-i", "fleet-monitor",
             "-t", f"{TOPIC}/telemetry", "-t", f"{TOPIC}/status", "-v", "-C", "4", "-W", str(SUB_TIMEOUT_S)],
            capture_output=True, text=True, timeout=SUB_TIMEOUT_S + 10,
        )  # fmt: skip
        assert sub.returncode == 0, sub.stderr
        got: dict[str, list[dict[str, Any]]] = {}
        for line in sub.stdout.splitlines():
            topic, _, payload = line.partition(" ")
            got.setdefault(topic.rsplit("/", 1)[1], []).append(json.loads(payload))
        assert got["status"][0]["state"] == "online" and got["status"][0]["device"] == DEVICE  # retained
        seqs = [t["seq"] for t in got["telemetry"]]
        assert len(seqs) >= 2 and seqs == sorted(seqs)
        assert all(t["device"] == DEVICE and t["interval_s"] == 0.5 for t in got["telemetry"])

        # the running fleet controller ingested it: the device is online in the fleet's state
        def online_in_fleet() -> bool:
            r = subprocess.run(
                _edgert("fleet", "status", "--fleet", str(site.fleet.path), "--json"),
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            row = json.loads(r.stdout)["devices"].get(DEVICE) or {}
            return bool(row.get("online")) and row.get("last_seen") is not None

        wait_for(online_in_fleet, timeout=READY_TIMEOUT_S, what="the device online in 'edgert fleet status'")
        # the forged message never arrived, although the watcher saw the device's own telemetry
        wait_for(lambda: len(watcher.on("/telemetry")) >= 2, what="telemetry at the watcher")
        assert all(m.payload != marker for m in watcher.messages)
    finally:
        watcher.close()
        codes = {name: _stop(p) for name, p in reversed(list(procs.items()))}
        if procs.get("agent") and procs["agent"].stderr:
            procs["agent"].stderr.close()
        link.close()
        for f in files:
            f.close()
    assert codes.get("daemon") == 0, (logs / "daemon.log").read_text()[-3000:]
    os.sync()
