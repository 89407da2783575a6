"""A provisioning site for tests: a fleet, a signed bundle, a real two-listener mosquitto (mutual TLS for
devices against the fleet CA, passwords for claims; edgert.provision.broker_conf), an enrollment
controller on the device listener as the fleet controller's identity, pty links through a proxy,
and agents in subprocesses."""

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

from edgert.fleet.enrollment import EnrollmentHandler
from edgert.fleet.fleetdir import FleetDir
from edgert.fleet.repo_init import init_fleet
from edgert.provision.broker_setup import BrokerSetup, set_claim_password, write_broker_setup
from edgert.provision.bundle import Bundle, create_bundle, write_bundle
from tests.brokers import TwoListenerMosquitto, free_port
from tests.provision.ptys import FaultProxy, Faults, close_pair, pty_pair

FLEET = "f1"


@dataclass(frozen=True)
class FleetPki:
    """What ``edgert provision broker-setup`` wrote: the broker's listeners and the controller's identity."""

    ca_path: Path  # the fleet CA certificate: verifies the broker and the devices
    setup: BrokerSetup

    @property
    def controller_tls(self) -> tuple[Path, Path, Path]:
        """(CA, cert, key) for a paho/mosquitto_sub client acting as the fleet controller."""
        return (self.ca_path, self.setup.controller_cert, self.setup.controller_key)


def fleet_pki(fleet: FleetDir, directory: Path, device_port: int, claim_port: int) -> FleetPki:
    """Run the operator's broker setup for loopback ports (certificates from the fleet CA, ACLs, conf)."""
    setup = write_broker_setup(
        fleet,
        directory,
        hosts=["localhost", "127.0.0.1"],
        device_port=device_port,
        claim_port=claim_port,
        bind="127.0.0.1",
    )
    return FleetPki(fleet.public_dir / "ca.pem", setup)


def point_fleet_at_broker(fleet_path: Path, port: int, pki: FleetPki) -> FleetDir:
    """fleet.toml [broker]: the device listener, with the controller's certificate (what an operator sets)."""
    toml = fleet_path / "fleet.toml"
    text = toml.read_text()
    head, sep, rest = text.partition("[broker]\n")
    _body, sep2, tail = rest.partition("\n[")
    _ca, cert, key = pki.controller_tls
    broker = (
        f'host = "127.0.0.1"\nport = {port}\nca_file = "{pki.ca_path}"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\nreconnect_min = 0.1\nreconnect_max = 1.0\n'
    )
    toml.write_text(head + sep + broker + sep2 + tail)
    return FleetDir.open(fleet_path)


class EnrollController:
    """The controller's enrollment attachment on its own paho client (mutual TLS, controller identity)."""

    def __init__(self, port: int, fleet: FleetDir, tls: tuple[Path, Path, Path]) -> None:
        self.handler = EnrollmentHandler(fleet)
        self.ready = threading.Event()
        self.c = paho.Client(
            CallbackAPIVersion.VERSION2, client_id="ctl", protocol=MQTTProtocolVersion.MQTTv5
        )
        self.c.tls_set(ca_certs=str(tls[0]), certfile=str(tls[1]), keyfile=str(tls[2]))
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
    broker: TwoListenerMosquitto
    pki: FleetPki
    controller: EnrollController | None

    @property
    def fleet_key(self) -> str:
        """The fleet key a technician trusts (``ed25519:...``): the fleet's publisher key."""
        return self.fleet.publisher_public

    def close(self) -> None:
        if self.controller is not None:
            self.controller.close()
        self.broker.stop()


def make_site(
    tmp: Path,
    *,
    uses: int = 5,
    lifetime: timedelta = timedelta(days=7),
    telemetry_interval: float = 60.0,
    controller: bool = True,
) -> Site:
    """Fleet, signed bundle, two-listener mosquitto and (unless ``controller=False``) the controller."""
    device_port, claim_port = free_port(), free_port()
    init_fleet(tmp / "fleet", fleet_id=FLEET, broker_port=device_port)
    pki = fleet_pki(FleetDir.open(tmp / "fleet"), tmp / "broker-setup", device_port, claim_port)
    fleet = point_fleet_at_broker(tmp / "fleet", device_port, pki)
    bundle = create_bundle(
        tmp / "fleet",
        groups=["default"],
        lifetime=lifetime,
        uses=uses,
        claim_broker=("127.0.0.1", claim_port),
        telemetry_interval=telemetry_interval,
    )
    write_bundle(bundle, tmp / "site.bundle")
    # what 'edgert provision bundle create --claim-passwords FILE' does
    set_claim_password(pki.setup.directory / "claims.passwd", bundle.claim_id, bundle.claim_secret)
    broker = TwoListenerMosquitto(
        tmp / "broker", port=device_port, claim_port=claim_port, setup_conf=pki.setup.conf
    ).start()
    ctl = EnrollController(device_port, fleet, pki.controller_tls) if controller else None
    return Site(tmp, fleet, bundle, tmp / "site.bundle", broker, pki, ctl)


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
