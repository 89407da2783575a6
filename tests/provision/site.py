"""A provisioning site for tests: a fleet, a bundle, a real mosquitto with the claim ACL, an enrollment
controller (paho + :class:`EnrollmentHandler`), pty links through a proxy, and agents in subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from edgert.fleet.enrollment import EnrollmentHandler, claim_acl
from edgert.fleet.fleetdir import FleetDir
from edgert.fleet.repo_init import init_fleet
from edgert.provision.bundle import Bundle, create_bundle, write_bundle
from tests.brokers import Mosquitto, free_port
from tests.provision.ptys import FaultProxy, Faults, close_pair, pty_pair

FLEET = "f1"
CONTROLLER_USER, CONTROLLER_PW = "controller", "controller-pw"


class EnrollController:
    """The fleet controller's enrollment attachment on its own paho client."""

    def __init__(self, port: int, fleet: FleetDir) -> None:
        self.handler = EnrollmentHandler(fleet)
        self.ready = threading.Event()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="ctl", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.c.username_pw_set(CONTROLLER_USER, CONTROLLER_PW)
        self.c.on_connect = lambda c, *a: [c.subscribe(t, qos=1) for t in self.handler.topics(fleet.id)]
        self.c.on_subscribe = lambda *a: self.ready.set()
        self.c.on_message = lambda c, u, m: self.handler.handle(
            m.topic, m.payload, lambda t, p, r: c.publish(t, p, qos=1, retain=r)
        )
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.ready.wait(20), "controller did not subscribe"

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@dataclass
class Site:
    """Everything a provisioning test needs."""

    tmp: Path
    fleet: FleetDir
    bundle: Bundle
    bundle_path: Path
    broker: Mosquitto
    controller: EnrollController

    def close(self) -> None:
        self.controller.close()
        self.broker.stop()


def make_site(tmp: Path, *, uses: int = 5, lifetime: timedelta = timedelta(days=7)) -> Site:
    """Fleet + bundle + mosquitto (passwords: controller and the claim; claim ACL) + controller."""
    port = free_port()
    fleet = init_fleet(tmp / "fleet", fleet_id=FLEET, broker_port=port).fleet
    bundle = create_bundle(tmp / "fleet", groups=["default"], lifetime=lifetime, uses=uses)
    write_bundle(bundle, tmp / "site.bundle")
    acl = f"user {CONTROLLER_USER}\ntopic readwrite edgert/#\n\n" + claim_acl(FLEET)
    broker = Mosquitto(
        tmp / "broker",
        port=port,
        acl=acl,
        passwords={CONTROLLER_USER: CONTROLLER_PW, bundle.claim_id: bundle.claim_secret},
    ).start()
    return Site(tmp, fleet, bundle, tmp / "site.bundle", broker, EnrollController(port, fleet))


class Link:
    """Two pty pairs joined by a :class:`FaultProxy`: ``host_path`` (technician), ``device_path`` (agent)."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.a, self.host_path = pty_pair()
        self.b, self.device_path = pty_pair()
        self.faults = faults or Faults()
        self.proxy = FaultProxy(self.a, self.b, self.faults)

    def close(self) -> None:
        self.proxy.close()
        close_pair(self.a)
        close_pair(self.b)


AGENT_SCRIPT = """
import os, signal, sys
from pathlib import Path
from edgert.provision.agent import Agent, serve
from edgert.provision.session import open_port
from edgert.security.atomic import FileSystem
kill_at = os.environ.get("KILL_AT_STEP")
def on_step(step):
    if kill_at and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
agent = Agent(Path(sys.argv[2]), Path(sys.argv[3]), fs=FileSystem(on_step), profile="cpu-generic")
with open_port(sys.argv[1]) as port:
    print("ready", flush=True)
    serve(port, agent)
"""


def start_agent(
    device_path: str, state: Path, config: Path, *, kill_at: str | None = None
) -> subprocess.Popen[bytes]:
    """The agent in its own process, on the device end of the link; returns once the port is open."""
    env = dict(os.environ)
    if kill_at:
        env["KILL_AT_STEP"] = kill_at
    proc = subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, device_path, str(state), str(config)],
        stdout=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == b"ready", f"agent did not start: {line!r}"
    return proc


def agent_events(state: Path) -> list[str]:
    """Event names in the device audit log."""
    import json

    out: list[str] = []
    for p in sorted((state / "audit").glob("*.jsonl")):
        for line in p.read_text().splitlines():
            doc: dict[str, Any] = json.loads(line)
            out.append(str(doc.get("event")))
    return out


def stop_agent(proc: subprocess.Popen[bytes]) -> int:
    """Kill the agent if it still runs; reap it and close its pipe; its exit status."""
    if proc.poll() is None:
        proc.kill()
    rc = proc.wait(30)
    if proc.stdout is not None:
        proc.stdout.close()
    return rc
