"""The whole provisioning flow over real ptys, agent in its own process, real mosquitto + enrollment."""

from __future__ import annotations

import contextlib
import io
import json
import signal
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from edgert.config import load_config
from edgert.errors import ProvisionError
from edgert.fleet.enrollment import load_claim
from edgert.provision.session import ErrorCode, HostSession, RemoteError, open_port
from edgert.provision.technician import run_flow
from edgert.security.keys import DeviceKeys
from edgert.security.package import create_package
from edgert.security.trust import load_publisher_key
from tests.mqtt.conftest import require_mosquitto
from tests.provision.ptys import Faults
from tests.provision.site import Link, Site, agent_events, make_site, start_agent, stop_agent
from tests.security.kit import source

pytestmark = pytest.mark.integration
WAIT_S = 60


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    require_mosquitto()
    s = make_site(tmp_path)
    yield s
    s.close()


def _package_for(site: Site, wrap_public: str, models_dir: Path) -> bytes:
    from edgert.security.keys import parse_public_key

    out = io.BytesIO()
    create_package(
        [source(models_dir / "digits_small_int8.onnx")],
        out,
        name="digits",
        version="3",
        recipients=[parse_public_key(wrap_public)],
        signer=load_publisher_key(site.fleet.publisher_key_path),
        now=datetime.now(timezone.utc),
    )
    return out.getvalue()


def test_full_flow_over_pty(site: Site, tmp_path: Path, models_dir: Path) -> None:
    state, config = tmp_path / "dev", tmp_path / "etc" / "edgert.toml"
    link = Link()
    agent = start_agent(link.device_path, state, config)
    try:
        with open_port(link.host_path) as port:
            host = HostSession(port)
            steps: list[tuple[str, str]] = []
            report = run_flow(
                host,
                site.bundle,
                device_id="gw-7",
                finish=False,
                on_step=lambda s, p, d: steps.append((s, p)),
            )
            assert [s for s, p in steps if p == "ok"] == [
                "hello",
                "info",
                "keys",
                "configure",
                "enroll",
                "selftest",
            ]
            assert report.enrolled and report.selftest_latency_ms is not None
            # the selftest reached the device listener with the device's own certificate (mutual TLS)
            assert report.broker_reachable is True and report.broker_credential == "device"
            assert report.provider == "CPUExecutionProvider"
            # the fleet CA signed a certificate for gw-7 over the device's own TLS key
            cert = x509.load_pem_x509_certificate((state / "tls" / "device.crt").read_bytes())
            assert cert.subject.rfc4514_string() == "CN=gw-7"
            assert cert.issuer == x509.load_pem_x509_certificate(site.fleet.ca_cert_path.read_bytes()).subject
            assert site.fleet.device("gw-7").groups == ("default",)
            assert load_claim(site.fleet, site.bundle.claim_id).uses == 1
            assert not (state / "provision" / "claim.json").exists()  # never used again
            cfg = load_config(config)
            assert cfg.mqtt is not None and cfg.mqtt.sync.device_id == "gw-7" and cfg.mqtt.sync.fleet == "f1"
            broker = cfg.mqtt.broker
            assert (broker.port, broker.cert_file) == (site.broker.port, str(state / "tls" / "device.crt"))
            assert broker.key_file == str(state / "keys" / "tls-p256.pem") and broker.username is None
            assert site.bundle.claim_secret not in config.read_text()
            assert (state / "tuf" / "root.json").read_bytes() == site.fleet.root_bytes()
            # install a signed package over the cable, with progress, then lock
            pkg = _package_for(site, site.fleet.device("gw-7").x25519, models_dir)
            seen: list[int] = []
            host.send_file("digits-3.edgepkg", pkg, progress=lambda d, t: seen.append(d))
            assert seen[-1] == len(pkg) and len(seen) > 2
            assert host.request("install_commit")["version"] == "3"
            assert host.request("finish")["locked"] is True
        assert agent.wait(WAIT_S) == 0  # the agent stops once the device is provisioned
    finally:
        stop_agent(agent)
        link.close()
    events = agent_events(state)
    for e in (
        "provision_keys",
        "provision_configure",
        "provision_claim_installed",
        "provision_enrolled",
        "provision_selftest",
        "provision_install",
        "provision_finish",
    ):
        assert e in events, e
    assert oct((state / "provision" / "state.json").stat().st_mode & 0o777) == "0o600"


def test_already_provisioned_device_refuses(site: Site, tmp_path: Path) -> None:
    from edgert.provision.agent import Agent
    from edgert.provision.local import LocalPort

    state, config = tmp_path / "dev", tmp_path / "edgert.toml"
    run_flow(HostSession(LocalPort(Agent(state, config))), site.bundle, device_id="gw-8")
    host = HostSession(LocalPort(Agent(state, config)))
    host.hello()
    assert host.request("info")["provisioned"] is True
    with pytest.raises(RemoteError) as info:
        host.request("keys", {"device_id": "gw-9"})
    assert info.value.code == ErrorCode.LOCKED and "factory-reset" in str(info.value)


def test_version_mismatch_over_pty(tmp_path: Path) -> None:
    link = Link()
    agent = start_agent(link.device_path, tmp_path / "dev", tmp_path / "edgert.toml")
    try:
        with open_port(link.host_path) as port:
            with pytest.raises(RemoteError) as info:
                HostSession(port).hello(versions=(9,))
            assert info.value.code == ErrorCode.VERSION
    finally:
        stop_agent(agent)
        link.close()


def test_faulty_line_completes_or_fails_clearly(site: Site, tmp_path: Path) -> None:
    """1% drops, 0.5% duplicates, 0.5% corrupted bytes, occasional 50 ms stalls."""
    state, config = tmp_path / "dev", tmp_path / "etc" / "edgert.toml"
    link = Link(Faults(drop=0.01, duplicate=0.005, corrupt=0.005, delay_s=0.05, delay_p=0.05, seed=7))
    agent = start_agent(link.device_path, state, config)
    try:
        with open_port(link.host_path) as port:
            host = HostSession(port, attempts=12)
            try:
                report = run_flow(host, site.bundle, device_id="gw-f")
            except ProvisionError as exc:  # allowed: a clear error, never a crash
                assert str(exc)
            else:
                assert report.enrolled
                assert report.resends > 0  # the faults really hit
    finally:
        stop_agent(agent)
        link.close()
    assert sum(link.faults.counts[k] for k in ("drop", "dup", "corrupt")) > 0
    if config.exists():
        load_config(config)  # never half-written


def test_kill_mid_configure_then_restart(site: Site, tmp_path: Path) -> None:
    state, config = tmp_path / "dev", tmp_path / "etc" / "edgert.toml"
    link = Link()
    agent = start_agent(link.device_path, state, config, kill_at="config:written")
    try:
        with open_port(link.host_path) as port:
            host = HostSession(port, attempts=2)
            host.hello()
            host.request("keys", {"device_id": "gw-k"})
            with pytest.raises(ProvisionError, match="no answer from device"):
                host.request("configure", {"bundle": site.bundle.device_public()})
        assert agent.wait(WAIT_S) == -signal.SIGKILL
        stop_agent(agent)
        assert not config.exists()  # the temp file was written, never moved into place
        agent = start_agent(link.device_path, state, config)
        with open_port(link.host_path) as port:
            host = HostSession(port)
            host.hello()
            assert host.request("info")["steps"] == {"keys": True}
            host.request("configure", {"bundle": site.bundle.device_public()})
        assert load_config(config).mqtt is not None
    finally:
        stop_agent(agent)
        link.close()


def _claim_client(site: Site, client_id: str) -> Any:
    """A paho client holding the bundle's claim, on the claim listener (TLS against the bundle's CA)."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5)
    c.username_pw_set(site.bundle.claim_id, site.bundle.claim_secret)
    c.tls_set(ca_certs=str(site.pki.ca_path))
    return c


def test_claim_holder_cannot_act_as_a_device(site: Site) -> None:
    """The broker ACL: the claim user may only publish its request and read its reply."""
    import threading

    from tests.mqtt.conftest import Recorder, wait_for

    watcher = Recorder(site.broker.port, "edgert/#", tls=site.pki.controller_tls)  # the controller's view

    def claim_publish(topic: str) -> None:
        connected = threading.Event()
        claim = _claim_client(site, f"claimer-{len(topic)}")
        claim.on_connect = lambda *a: connected.set()
        claim.connect("127.0.0.1", site.broker.claim_port)
        claim.loop_start()
        try:
            assert connected.wait(20)
            info = claim.publish(topic, b"{}", qos=1)
            with contextlib.suppress(RuntimeError):  # mosquitto may drop a client that breaks its ACL
                info.wait_for_publish(10)
        finally:
            claim.disconnect()
            claim.loop_stop()

    try:
        for topic in (
            "edgert/v1/f1/devices/gw-x/status",
            "edgert/v1/f1/devices/gw-x/telemetry",
            "edgert/v1/f1/enroll/claim-other/request",
        ):
            claim_publish(topic)
        # control: the one topic it may use does arrive (so the watcher would have seen the others)
        mine = f"edgert/v1/f1/enroll/{site.bundle.claim_id}/request"
        claim_publish(mine)
        wait_for(lambda: bool(watcher.on("/request")), what="the claim's own request")
        assert [m.topic for m in watcher.messages] == [mine]
    finally:
        watcher.close()


def _claim_connects(site: Site, port: int) -> bool:
    """Does the broker accept the bundle's claim on ``port``? (False: refused, or TLS failed.)"""
    import ssl
    import threading

    connected, over = threading.Event(), threading.Event()
    claim = _claim_client(site, f"claimer-{port}")
    claim.on_connect = lambda c, u, f, rc, p: (connected.set() if not rc.is_failure else None, over.set())
    claim.on_disconnect = lambda *a: over.set()
    try:
        claim.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError):  # TLS 1.2: the handshake itself fails
        return False
    claim.loop_start()
    try:
        assert over.wait(20), "no CONNACK and no disconnect"
        return connected.is_set()
    finally:
        claim.disconnect()
        claim.loop_stop()


def test_claim_cannot_connect_to_the_device_listener(site: Site) -> None:
    """The device listener wants a certificate from the fleet CA; the claim's password gets nowhere."""
    assert _claim_connects(site, site.broker.claim_port)  # control: the claim works where it belongs
    assert not _claim_connects(site, site.broker.port)  # no client certificate: refused


def test_revoked_claim_is_refused_by_the_broker_after_reload(site: Site) -> None:
    """'claims revoke --claim-passwords FILE' + a broker reload: the claim cannot even connect."""
    import os

    from click.testing import CliRunner

    from edgert.cli.provision import provision
    from tests.mqtt.conftest import wait_for

    assert _claim_connects(site, site.broker.claim_port)
    passwd = site.pki.setup.directory / "claims.passwd"
    args = ["claims", "revoke", "--fleet", str(site.fleet.path), site.bundle.claim_id]
    r = CliRunner().invoke(provision, [*args, "--claim-passwords", str(passwd)])
    assert r.exit_code == 0, r.output
    assert load_claim(site.fleet, site.bundle.claim_id).revoked
    assert site.broker.proc is not None
    os.kill(site.broker.proc.pid, signal.SIGHUP)  # systemctl reload mosquitto
    wait_for(lambda: not _claim_connects(site, site.broker.claim_port), what="the broker to refuse the claim")


def test_expired_bundle_names_the_date(site: Site) -> None:
    from edgert.provision.bundle import load_bundle

    later = datetime.now(timezone.utc) + timedelta(days=8)
    with pytest.raises(ProvisionError, match=f"bundle expired on {site.bundle.expires}"):
        load_bundle(site.bundle_path, trusted=None, now=later)


def test_bundle_holds_no_private_key(site: Site) -> None:
    text = site.bundle_path.read_text()
    assert "PRIVATE KEY" not in text
    doc = json.loads(text)
    assert set(doc) >= {"fleet", "broker", "tuf_root", "publisher", "command_pem", "capture", "claim"}
    assert oct(site.bundle_path.stat().st_mode & 0o777) == "0o600"
    assert DeviceKeys  # device keys are made on the device only (see test_full_flow_over_pty)
