"""Issue 5's "Done when", end to end: a real ``edgert daemon`` subprocess, a real mosquitto with mutual TLS
(``require_certificate``, ``use_identity_as_username``, the ``pattern`` ACL), the device's own P-256 key.

The device keys come from ``edgert keys init`` (the real CLI); the test CA signs the CSR of the keystore's
TLS key, so the daemon authenticates with the key the device generated. The fleet side is the real
``mosquitto_sub`` CLI and a paho publisher holding the ``fleet`` certificate. The daemon reaches the broker
through a socat proxy, so the outage test can keep the device cut off until the fleet monitor is
subscribed again (otherwise a fast replay could finish before anyone listens: a test race, not a loss).

Tests in this module share one daemon and run in file order; the outage and reboot tests come last.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgert.client import Client
from edgert.mqtt.signing import sign_command
from tests.brokers import CA, DEVICE_ACL, Mosquitto, TcpProxy
from tests.mqtt.conftest import (
    DEVICE,
    FLEET,
    Recorder,
    assert_complete_in_order,
    require_mosquitto,
    telemetry_seqs,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = Path(__file__).resolve().parents[2] / "models"
TOPIC = f"edgert/v1/{FLEET}/devices/{DEVICE}"
#: Broker outage in the end-to-end test; the 60 s outage runs in test_sync_broker (slow) and bench_mqtt.
OUTAGE_S = float(os.environ.get("EDGERT_E2E_OUTAGE_S", "3"))
READY_TIMEOUT_S = 60.0
SUB_TIMEOUT_S = 20
#: Pause between requests while a mosquitto_sub reader runs (the loop ends as soon as it exits).
INFER_PACE_S = 0.02


@dataclass
class Device:
    """Everything the tests need to reach the daemon and act as the fleet."""

    tmp: Path
    state: Path
    broker: Mosquitto
    proxy: TcpProxy
    fleet_tls: tuple[Path, Path, Path]
    command_key: Ed25519PrivateKey
    config: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Any = None
    monitor: Recorder | None = None
    extra_monitors: list[Recorder] = field(default_factory=list)

    @property
    def sock(self) -> Path:
        return self.tmp / "edgert.sock"

    def sub_start(self, channel: str, count: int, timeout: int = SUB_TIMEOUT_S) -> subprocess.Popen[str]:
        """Start the real mosquitto_sub CLI reading ``count`` messages from the device's ``channel``."""
        ca, cert, key = self.fleet_tls
        return subprocess.Popen(
            ["mosquitto_sub", "-h", "localhost", "-p", str(self.broker.port), "-V", "mqttv5",
             "--cafile", str(ca), "--cert", str(cert), "--key", str(key), "-i", f"mon-{time.monotonic_ns()}",
             "-t", f"{TOPIC}/{channel}", "-C", str(count), "-W", str(timeout)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    @staticmethod
    def sub_result(proc: subprocess.Popen[str], timeout: int = SUB_TIMEOUT_S) -> list[dict[str, Any]]:
        """Wait for a :meth:`sub_start` reader and return the JSON documents it printed."""
        out, err = proc.communicate(timeout=timeout + 10)
        assert proc.returncode == 0, f"mosquitto_sub failed ({proc.returncode}): {err}"
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def sub(self, channel: str, count: int, timeout: int = SUB_TIMEOUT_S) -> list[dict[str, Any]]:
        """Read ``count`` messages from the device's ``channel`` with the real mosquitto_sub CLI."""
        return self.sub_result(self.sub_start(channel, count, timeout), timeout)

    def command(self, payload: bytes, corr: bytes, timeout: float = 20.0) -> dict[str, Any]:
        """Publish a command as the fleet and return the reply correlated by MQTT 5 correlation data."""
        assert self.monitor is not None
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = corr
        self.monitor.publish(f"{TOPIC}/cmd", payload, props)

        def reply() -> list[Any]:
            assert self.monitor is not None
            return [m for m in self.monitor.on("/reply") if m.properties.CorrelationData == corr]

        wait_for(lambda: bool(reply()), timeout=timeout, what=f"reply {corr!r}")
        return dict(json.loads(reply()[0].payload))

    def signed(self, cmd: str, corr: bytes, **args: Any) -> dict[str, Any]:
        """Sign ``cmd`` with the fleet command key and send it."""
        payload = sign_command(
            self.command_key, cmd=cmd, fleet=FLEET, device=DEVICE, now=time.time(), args=args
        )
        return self.command(payload, corr)

    def store_active(self, model: str) -> str | None:
        """The version the device's store calls active (what `edgert models list` shows)."""
        from edgert.security.loader import open_keystore, open_store

        return open_store(self.state, open_keystore(self.state)).entry(model).active

    def served_version(self, model: str) -> str:
        """The version the daemon serves now (OIP metadata over its socket)."""
        with Client(f"unix://{self.sock}") as c:
            return str(c.metadata(model)["versions"][0])


def _daemon_config(tmp: Path, state: Path, port: int, pki: Path, tls: tuple[Path, Path], pub: Path) -> Path:
    cert, key = tls
    path = tmp / "edgert.toml"
    path.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{state}"
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{tmp / "edgert.sock"}"
mode = "0600"
[mqtt]
host = "127.0.0.1"
port = {port}
fleet = "{FLEET}"
device_id = "{DEVICE}"
ca_file = "{pki / "edgert-test-ca.pem"}"
cert_file = "{cert}"
key_file = "{key}"
command_key_file = "{pub}"
telemetry_interval = 0.25
reconnect_min = 0.2
reconnect_max = 1.0
keepalive = 5
spool_path = "{state / "spool" / "telemetry.sqlite"}"
[[models]]
name = "digits"
""")
    return path


def _start_daemon(dev: Device) -> None:
    dev.log = open(dev.tmp / "daemon.log", "ab")  # a file, not a pipe: a full pipe would block the daemon
    dev.proc = subprocess.Popen(
        [sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(dev.config)],
        stdout=subprocess.DEVNULL, stderr=dev.log,
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert dev.proc.poll() is None, "daemon exited: " + (dev.tmp / "daemon.log").read_text()[-2000:]
        try:
            with Client(f"unix://{dev.sock}") as c:
                if c.ready():
                    return
        except Exception:
            pass
        assert time.monotonic() < deadline, "daemon did not become ready"
        time.sleep(0.05)


def _stop_daemon(dev: Device) -> int:
    proc, dev.proc = dev.proc, None
    if proc is None:
        return 0
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = proc.wait()
    dev.log.close()
    return code


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgert.cli.main", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Device]:
    """PKI, an mTLS mosquitto with the ACL, a device keystore and store, and the running daemon."""
    require_mosquitto()
    from edgert.device.importing import import_plaintext
    from edgert.security.loader import open_keystore, open_store

    tmp = tmp_path_factory.mktemp("e2e")
    state, pki = tmp / "state", tmp / "pki"
    pki.mkdir()
    # The device creates its own keys with the real CLI; the CA only ever sees the CSR.
    r = _cli("keys", "init", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    keys = open_keystore(state)
    ca = CA.create(pki)
    device_cert = ca.sign_csr(pki, keys.tls_csr(DEVICE))
    device_key = state / "keys" / "tls-p256.pem"
    store = open_store(state, keys)
    import_plaintext(store, MODELS / "digits_small_int8.onnx", name="digits", version="1")
    import_plaintext(store, MODELS / "digits_large_int8.onnx", name="digits", version="2")
    server = ca.issue(pki, "localhost", server=True)
    fleet_cert, fleet_key = ca.issue(pki, "fleet")
    broker = Mosquitto(
        tmp / "broker", tls=(ca.path, *server), require_certificate=True, acl=DEVICE_ACL
    ).start()
    proxy = TcpProxy(broker.port).start()
    cmd_key = Ed25519PrivateKey.generate()
    pub = tmp / "fleet-cmd.pub"
    pub.write_bytes(
        cmd_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    config = _daemon_config(tmp, state, proxy.port, pki, (device_cert, device_key), pub)
    dev = Device(tmp, state, broker, proxy, (ca.path, fleet_cert, fleet_key), cmd_key, config)
    dev.monitor = Recorder(broker.port, f"{TOPIC}/#", tls=dev.fleet_tls)
    try:
        _start_daemon(dev)
        yield dev
    finally:
        code = _stop_daemon(dev)
        for rec in [dev.monitor, *dev.extra_monitors]:
            rec.close()
        proxy.stop()
        broker.stop()
    assert code == 0, (tmp / "daemon.log").read_text()[-3000:]


def test_device_key_is_the_keystore_key_and_broker_requires_it(device: Device) -> None:
    from cryptography import x509

    from edgert.security.keys import load_keystore

    cert = x509.load_pem_x509_certificate((device.tmp / "pki" / f"{DEVICE}.crt").read_bytes())
    tls_public = load_keystore(device.state / "keys").tls.public_key()
    assert cert.public_key() == tls_public
    # Without a client certificate mosquitto_sub is refused (require_certificate true).
    ca = device.fleet_tls[0]
    out = subprocess.run(
        ["mosquitto_sub", "-h", "localhost", "-p", str(device.broker.port), "--cafile", str(ca),
         "-t", f"{TOPIC}/status", "-C", "1", "-W", "5"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode != 0


def test_status_and_telemetry_are_readable_with_mosquitto_sub(device: Device) -> None:
    status = device.sub("status", 1)[0]  # retained
    assert status["v"] == 1 and status["state"] == "online" and status["device"] == DEVICE
    assert status["models"] == {"digits": "2"} and status["providers"] == ["CPUExecutionProvider"]
    x = np.load(MODELS / "digits_test.npz")["x"][:4]
    # Telemetry counts are per-interval deltas. Requests sent before mosquitto_sub has subscribed may
    # land in a reading it never sees (the flake of issue 9 #22), so keep serving until the reader has
    # its messages: the condition is the reader finishing, not a time.
    reader = device.sub_start("telemetry", 8)
    served = 0
    with Client(f"unix://{device.sock}") as c:
        while True:
            c.infer("digits", {"pixels": x})
            served += 1
            try:
                reader.wait(timeout=INFER_PACE_S)
                break
            except subprocess.TimeoutExpired:
                continue
    docs = device.sub_result(reader)
    assert served > 0 and len(docs) == 8
    assert all(d["v"] == 1 and d["device"] == DEVICE for d in docs)
    seqs = [d["seq"] for d in docs]
    assert seqs == sorted(seqs) and len(set(d["boot"] for d in docs)) == 1
    assert any(d["models"].get("digits", {}).get("requests", 0) > 0 for d in docs)
    assert all(d["device_stats"]["rss_bytes"] > 0 for d in docs)


def test_signed_commands_are_answered(device: Device) -> None:
    ping = device.signed("ping", b"ping-1", echo="hello")
    assert ping["ok"] is True and ping["result"] == {"pong": True, "echo": "hello"} and ping["cmd"] == "ping"
    st = device.signed("get-status", b"status-1")
    assert st["ok"] is True
    assert st["result"]["status"]["models"]["digits"]["version"] == "2"
    assert st["result"]["sync"]["connected"] is True
    interval = device.signed("set-telemetry-interval", b"interval-1", seconds=0.5)
    assert interval["ok"] is True and interval["result"] == {"telemetry_interval": 0.5}
    wait_for(
        lambda: any(d.get("interval_s") == 0.5 for d in device.sub("telemetry", 1)),
        timeout=30,
        what="telemetry at the new interval",
    )
    logs = device.signed("collect-logs", b"logs-1", lines=20)
    assert logs["ok"] is True, logs
    lines = [json.loads(line) for line in logs["result"]["lines"]]
    assert 0 < len(lines) <= 20 and all(d["logger"].startswith("edgert.") for d in lines)
    assert any(d["msg"] == "connected to broker" for d in lines)
    bad = device.signed("set-telemetry-interval", b"interval-bad", seconds="fast")
    assert bad["ok"] is False and bad["error"]["code"] == "bad_args"
    device.signed("set-telemetry-interval", b"interval-2", seconds=0.25)


def test_unsigned_replayed_and_forged_commands_are_refused(device: Device) -> None:
    body = json.dumps({"v": 1, "cmd": "ping", "args": {}, "fleet": FLEET, "device": DEVICE})
    unsigned = device.command(json.dumps({"v": 1, "body": body}).encode(), b"unsigned")
    assert unsigned["ok"] is False and unsigned["error"]["code"] == "unsigned"
    captured = sign_command(device.command_key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time())
    assert device.command(captured, b"first")["ok"] is True
    replay = device.command(captured, b"replay")
    assert replay["ok"] is False and replay["error"]["code"] == "replayed"
    forged = sign_command(
        Ed25519PrivateKey.generate(), cmd="ping", fleet=FLEET, device=DEVICE, now=time.time()
    )
    assert device.command(forged, b"forged")["error"]["code"] == "bad_signature"
    other = sign_command(device.command_key, cmd="ping", fleet=FLEET, device="dev-b", now=time.time())
    assert device.command(other, b"other-device")["error"]["code"] == "wrong_device"


def test_activate_model_command_hot_swaps(device: Device) -> None:
    refused = device.signed("activate-model", b"activate-0", model="digits", version="1")
    assert refused["ok"] is False and "anti-rollback" in refused["error"]["message"]
    reply = device.signed("activate-model", b"activate-1", model="digits", version="1", allow_downgrade=True)
    assert reply["ok"] is True, reply
    assert {"model": "digits", "version": "1", "previous": "2"}.items() <= reply["result"].items()
    assert device.served_version("digits") == "1" == device.store_active("digits")
    back = device.signed("activate-model", b"activate-2", model="digits", version="2")
    assert back["ok"] is True and back["result"]["version"] == "2"
    assert device.served_version("digits") == "2"
    missing = device.signed("activate-model", b"activate-3", model="digits", version="9")
    assert missing["ok"] is False and missing["error"]["code"] == "failed"
    assert "no installed version '9'" in missing["error"]["message"]
    assert device.served_version("digits") == "2" == device.store_active("digits")


def test_rollback_model_command_goes_to_the_previous_version(device: Device) -> None:
    reply = device.signed("rollback-model", b"rollback-1", model="digits")
    assert reply["ok"] is True, reply
    assert {"model": "digits", "version": "1", "previous": "2"}.items() <= reply["result"].items()
    assert device.served_version("digits") == "1" == device.store_active("digits")
    again = device.signed("activate-model", b"rollback-restore", model="digits", version="2")
    assert again["ok"] is True and device.served_version("digits") == "2"


def test_broker_outage_loses_no_telemetry_and_never_blocks_inference(device: Device) -> None:
    old = device.monitor
    assert old is not None
    x = np.load(MODELS / "digits_test.npz")["x"][:1]
    calls, errors, stop = [0], [0], threading.Event()

    def serve() -> None:
        with Client(f"unix://{device.sock}") as c:
            while not stop.is_set():
                try:
                    c.infer("digits", {"pixels": x})
                    calls[0] += 1
                except Exception:
                    errors[0] += 1

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        wait_for(lambda: len(old.on("/telemetry")) >= 3, what="live telemetry")
        device.proxy.stop()
        device.broker.kill()
        down_at, calls_down = time.time(), calls[0]
        threading.Event().wait(OUTAGE_S)
        assert calls[0] > calls_down, "inference kept being served during the outage"
        device.broker.start()
        # The fleet monitor subscribes before the device can reach the broker again.
        monitor2 = Recorder(device.broker.port, f"{TOPIC}/#", tls=device.fleet_tls)
        # From here on the new monitor is the fleet's publisher too (the old one reconnects on its own).
        device.extra_monitors.append(old)
        device.monitor = monitor2
        device.proxy.start()
        up_at = time.time()

        def live_after_replay() -> bool:
            seqs = telemetry_seqs(monitor2)
            replayed = [s for s, r in seqs if r]
            return bool(replayed) and any(s > max(replayed) and not r for s, r in seqs)

        wait_for(live_after_replay, timeout=60 + OUTAGE_S, what="replayed then live telemetry")
    finally:
        stop.set()
        worker.join()
    assert errors[0] == 0, "no inference request failed during the outage"
    docs = [d for d in old.json_on("/telemetry") + monitor2.json_on("/telemetry")]
    assert len({d["boot"] for d in docs}) == 1, "one daemon boot throughout"
    # Records in flight when the broker died are re-sent as-is (MQTT DUP, no flag) ahead of the replay.
    last_replayed = max(s for s, r in telemetry_seqs(monitor2) if r)
    first_live = min(s for s, r in telemetry_seqs(monitor2) if not r and s > last_replayed)
    # Every reading from the first (seq 1, seen by the monitor subscribed before the daemon started)
    # to the first live one after the outage arrived, and in order.
    assert_complete_in_order(telemetry_seqs(old, monitor2), first_live)
    replayed = [d for d in monitor2.json_on("/telemetry") if d.get("replayed")]
    assert replayed, "records spooled during the outage are flagged replayed"
    # Replayed records keep their original timestamps (taken while the broker was down or before).
    assert all(d["ts"] < up_at + 1.0 for d in replayed)
    assert any(down_at <= d["ts"] <= up_at for d in replayed)
    outage_seqs = sorted(d["seq"] for d in replayed)
    assert outage_seqs == list(range(outage_seqs[0], outage_seqs[-1] + 1)), "replayed in order, no gap"
    # The device is back online (retained status republished to the restarted, empty broker).
    assert device.sub("status", 1)[0]["state"] == "online"
    sync = device.signed("get-status", b"after-outage")["result"]["sync"]
    assert sync["spool"]["dropped_full"] == 0 and sync["spool"]["dropped_disk_full"] == 0
    assert sync["replayed"] >= len(outage_seqs)


def test_reboot_daemon_command_restarts_and_comes_back_online(device: Device) -> None:
    assert device.monitor is not None
    before = len(device.monitor.on("/status"))
    reply = device.signed("reboot-daemon", b"reboot-1")
    assert reply["ok"] is True and reply["result"]["restarting"] is True, reply
    states = lambda: [json.loads(m.payload)["state"] for m in device.monitor.on("/status")[before:]]  # type: ignore[union-attr]  # noqa: E731
    wait_for(lambda: "offline" in states(), timeout=30, what="graceful offline before the restart")
    wait_for(lambda: states()[-1:] == ["online"], timeout=60, what="online again after the restart")
    assert json.loads(device.monitor.on("/status")[-1].payload)["uptime_s"] < 30
    assert device.served_version("digits") == "2"
