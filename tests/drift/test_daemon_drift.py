"""Drift in a real daemon over a real mosquitto: a shifted stream raises a ``drift`` event on MQTT, an audit
record, Prometheus gauges and telemetry, and a sealed capture of N samples that the fleet key opens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.backends.describe import describe_file
from edgert.client import Client
from edgert.drift.reference import profile_model_file
from edgert.security.audit_chain import read_records
from edgert.security.loader import open_keystore, open_store
from edgert.security.package import VariantSource, create_package
from tests.brokers import Mosquitto
from tests.device.subproc import cli, free_port
from tests.mqtt.conftest import Recorder, require_mosquitto, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "digits_small_int8.onnx"
TOPIC = "edgert/v1/f1/devices/dev-a"
CAPTURE_SAMPLES = 8


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def _install_with_reference(state: Path, tmp: Path) -> None:
    """Package digits with the profile of the training split (as a fleet would) and install it."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    xtr, _, _, _ = train_test_split(ds.data.astype(np.float32), ds.target, test_size=0.2, random_state=0,
                                    stratify=ds.target)
    data = tmp / "train.npz"
    np.savez(data, pixels=xtr)
    reference = profile_model_file(MODEL, data)
    store = open_store(state, open_keystore(state, create=True))
    fmt, variant, ins, outs = describe_file(MODEL)
    pkg = tmp / "digits-1.edgepkg"
    with open(pkg, "w+b") as out:
        create_package([VariantSource(MODEL, variant, fmt, ins, outs)], out, name="digits", version="1",
                       recipients=[store.keys.wrap_public], signer=store.keys.sign,
                       now=datetime.now(timezone.utc), reference=reference)
    store.install(pkg)


def _config(tmp: Path, state: Path, broker: Mosquitto, fleet_public: str, metrics_port: int) -> Path:
    path = tmp / "edgert.toml"
    path.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{state}"
drain_timeout_s = 5
[http]
listen = ""
[metrics]
listen = "127.0.0.1:{metrics_port}"
[socket]
path = "{tmp / "edgert.sock"}"
mode = "0600"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
fleet = "f1"
device_id = "dev-a"
telemetry_interval = 0.3
spool_path = "{tmp / "spool.sqlite"}"
[[models]]
name = "digits"
[models.drift]
window = 240
min_samples = 120
sample_every = 1
capture_samples = {CAPTURE_SAMPLES}
capture_fleet_key = "{fleet_public}"
""")
    return path


def _metric(port: int, name: str) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'edgert_{name}{{model="digits"}}'):
            return float(line.rsplit(" ", 1)[1])
    return None


def _events(rec: Recorder, kind: str) -> list[dict[str, Any]]:
    return [d for d in rec.json_on(f"{TOPIC}/events") if d.get("event") == kind]


def test_shifted_stream_raises_a_drift_event_and_sealed_evidence(tmp_path: Path, broker: Mosquitto) -> None:
    state = tmp_path / "state"
    _install_with_reference(state, tmp_path)
    fleet_key = tmp_path / "fleet" / "capture.pem"
    made = cli("capture", "keygen", str(fleet_key))
    assert made.returncode == 0, made.stderr
    fleet_public = made.stdout.strip().splitlines()[-1]
    metrics_port = free_port()
    config = _config(tmp_path, state, broker, fleet_public, metrics_port)
    rec = Recorder(broker.port)
    proc = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    held_out = np.asarray(np.load(MODELS / "digits_test.npz")["x"], np.float32)
    shifted = (16.0 - held_out).astype(np.float32)  # inverted digits
    sent_shifted: list[np.ndarray] = []
    try:
        wait_for(lambda: rec.on("/status"), timeout=60, what="online status from the daemon")
        with Client(f"unix://{tmp_path / 'edgert.sock'}") as c:
            for i in range(0, 240, 2):  # in-distribution traffic: scored, no alarm
                c.infer("digits", {"pixels": held_out[i:i + 2]})
            drift = c.status()["models"]["digits"]["drift"]
            assert drift["samples"] >= 120 and drift["alarm"] is False
            assert drift["inputs"]["pixels"]["psi"] < 0.25
            assert _metric(metrics_port, "drift_alarm") == 0.0
            for i in range(len(shifted)):  # one row per request, as a camera would send them
                sent_shifted.append(shifted[i:i + 1])
                c.infer("digits", {"pixels": shifted[i:i + 1]})
                if _events(rec, "drift_capture"):
                    break
            wait_for(lambda: _events(rec, "drift_capture"), what="the drift capture to complete")
            status = c.status()["models"]["digits"]["drift"]
            assert status["alarm"] is True and status["alarms"] == 1
            assert c.infer("digits", {"pixels": held_out[:1]})["logits"].shape == (1, 10)  # still serving
        assert (_metric(metrics_port, "drift_psi") or 0.0) > 0.25
        wait_for(lambda: any((d["models"].get("digits", {}).get("drift_psi") or 0) > 0.25
                             for d in rec.json_on(f"{TOPIC}/telemetry")), what="drift scores in telemetry")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        rec.close()
    assert proc.returncode == 0, err.decode()[-2000:]
    events = _events(rec, "drift")
    assert len(events) == 1, events  # one alarm, not one per request
    event = events[0]
    assert event["model"] == "digits" and event["version"] == "1"
    assert any(c.startswith("input pixels: psi") for c in event["crossed"])
    assert event["capture"]["samples"] == CAPTURE_SAMPLES
    assert event["scores"]["inputs"]["pixels"]["psi"] > 0.25
    done = _events(rec, "drift_capture")[0]
    assert done["id"] == event["id"] and done["captured"] == CAPTURE_SAMPLES
    audited = [r["data"] for r in read_records(state / "audit") if r["event"] == "drift"]
    assert len(audited) == 1 and audited[0]["id"] == event["id"]
    # the evidence: sealed to the fleet key, exactly the shifted requests that followed the alarm
    files = sorted((state / "capture" / "digits").glob("*.sealed"))
    out = tmp_path / "opened"
    opened = cli("capture", "open", *map(str, files), "--key", str(fleet_key), "--out", str(out))
    assert opened.returncode == 0, opened.stderr
    assert f"{CAPTURE_SAMPLES} records" in opened.stderr
    summary = cli("capture", "open", *map(str, files), "--key", str(fleet_key))
    metas = [json.loads(line)["meta"] for line in summary.stdout.splitlines()]
    assert all(m["reason"] == "drift" and m["drift_event"] == event["id"] for m in metas)
    records = [np.load(p) for p in sorted(out.glob("record-*.npz"))]
    sent = {row.tobytes() for row in sent_shifted}
    assert all(r["in_pixels"].tobytes() in sent for r in records)
    device_key = cli("capture", "open", *map(str, files), "--key", str(state / "keys" / "x25519.pem"))
    assert device_key.returncode != 0  # the device cannot read its own evidence
