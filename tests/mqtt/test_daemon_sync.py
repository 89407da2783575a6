"""A real `edgert daemon` with [mqtt] against a real mosquitto: status, per-model telemetry, offline."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from tests.brokers import Mosquitto
from tests.mqtt.conftest import Recorder, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODELS = Path(__file__).resolve().parents[2] / "models"


def test_daemon_runs_sync_when_mqtt_is_configured(tmp_path: Path, broker: Mosquitto) -> None:
    rec = Recorder(broker.port)
    config = tmp_path / "edgert.toml"
    config.write_text(f"""
[daemon]
profile = "cpu-generic"
state_dir = "{tmp_path / "state"}"
allow_plaintext = true
drain_timeout_s = 5
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{tmp_path / "edgert.sock"}"
mode = "0600"
[mqtt]
host = "127.0.0.1"
port = {broker.port}
fleet = "f1"
device_id = "dev-a"
telemetry_interval = 0.5
spool_path = "{tmp_path / "spool.sqlite"}"
[[models]]
name = "digits-small"
path = "{MODELS / "digits_small_int8.onnx"}"
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgert.cli.main", "daemon", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ),
    )
    try:
        wait_for(lambda: rec.on("/status"), timeout=60, what="online status from the daemon")
        online = rec.json_on("/status")[0]
        assert online["state"] == "online" and online["models"] == {"digits-small": "1"}
        assert online["providers"] == ["CPUExecutionProvider"]
        wait_for(lambda: (tmp_path / "edgert.sock").exists(), what="socket")
        x = np.load(MODELS / "digits_test.npz")["x"][:4]
        with Client(f"unix://{tmp_path / 'edgert.sock'}") as c:
            for _ in range(5):
                c.infer("digits-small", {"pixels": x})

        def served() -> bool:
            return any(
                d["models"].get("digits-small", {}).get("requests", 0) > 0 for d in rec.json_on("/telemetry")
            )

        wait_for(served, timeout=30, what="telemetry with the model's requests")
        doc = next(
            d for d in rec.json_on("/telemetry") if d["models"].get("digits-small", {}).get("requests")
        )
        stats = doc["models"]["digits-small"]
        assert stats["latency_s"]["p50"] > 0 and stats["provider"] == "CPUExecutionProvider"
        assert doc["device_stats"]["rss_bytes"] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()[-2000:]
    wait_for(lambda: rec.json_on("/status")[-1]["state"] == "offline", what="graceful offline")
    rec.close()
