"""Issue 11 item 9: rollouts to a few dozen simulated devices, end to end, through tools/fleet_sim.py.

Real processes only: mosquitto (tests/brokers.Mosquitto: no queue limits, as DESIGN §6 asks for many
QoS 1 messages), the real controller (`edgert fleet serve`), `edgert fleet deploy`, and simulated
devices in two processes, each running the real SyncService, DeviceUpdater and Deployer over its own
MQTT connection with its own keys and store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Mosquitto
from tests.device.models_kit import fails_at_run
from tests.mqtt.conftest import require_mosquitto

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "fleet_sim.py"
DEVICES, PROCS = 24, 2
#: A bound on the whole tool run (setup, rollout, stop), not a speed check.
RUN_TIMEOUT_S = 600


def _sim(tmp: Path, broker: Mosquitto, *extra: str) -> tuple[int, dict[str, Any], str]:
    fleet = tmp / "fleet"
    subprocess.run([sys.executable, "-m", "edgert.cli.main", "fleet", "init", str(fleet), "--id", "simtest",
                    "--broker-port", str(broker.port)], check=True, capture_output=True)
    report = tmp / "report.json"
    r = subprocess.run([sys.executable, str(TOOL), "--devices", str(DEVICES), "--procs", str(PROCS),
                        "--fleet", str(fleet), "--broker", f"127.0.0.1:{broker.port}", "--group", "lab",
                        "--work-dir", str(tmp / "work"), "--report", str(report), "--setup-timeout", "300",
                        "--rollout-timeout", "300", *extra],
                       capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env={**os.environ})
    logs = r.stderr[-3000:] + "".join(p.read_text(errors="replace")[-2000:]
                                      for p in (tmp / "work").rglob("*.log"))
    return r.returncode, json.loads(report.read_text()) if report.exists() else {}, logs


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    require_mosquitto()
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


def test_a_rollout_in_waves_to_two_dozen_simulated_devices_completes(tmp_path: Path,
                                                                      broker: Mosquitto) -> None:
    code, report, logs = _sim(tmp_path, broker, "--waves", "10%,50%,100%", "--max-failure-rate", "0%")
    assert code == 0, logs
    assert report["rollout_state"] == "complete", report
    assert [w["devices"] for w in report["waves"]] == [3, 9, 12]  # per wave: ceil(share * 24) in all so far
    outcomes = report["outcomes"]
    assert outcomes["final_states"] == {"active": DEVICES}
    # the Deployer swapped the new version in and committed the store on every device
    assert outcomes["serving_new"] == DEVICES and outcomes["store_and_served_disagree"] == 0


def test_a_rollout_where_half_the_devices_fail_their_health_check_halts(
        tmp_path: Path, broker: Mosquitto) -> None:
    # Half of the devices load a build that fails at its first run (the Deployer's health check).
    # Waves of 6, 6 and 12 devices: the chance that neither of the first two waves holds a faulty
    # device is C(12,12)/C(24,12), about 4e-7, so the halt comes before the last wave.
    broken = fails_at_run(tmp_path / "broken.onnx")
    code, report, logs = _sim(tmp_path, broker, "--waves", "25%,50%,100%", "--max-failure-rate", "10%",
                              "--min-attempts", "4", "--fail-fraction", "0.5", "--broken-model", str(broken))
    assert code == 0, logs
    assert report["faulty"] == DEVICES // 2
    assert report["rollout_state"] == "halted", report
    assert "failure rate" in report["reason"], report
    assert len(report["waves"]) < 3, "the halt stopped the rollout before its last wave"
    outcomes = report["outcomes"]
    assert outcomes["final_states"].get("failed", 0) >= 1
    assert outcomes["faulty_serving_new"] == 0, "a device that failed its health check kept the old version"
    assert outcomes["store_and_served_disagree"] == 0
    # devices of the wave that never started stay on the old version
    started = sum(w["devices"] for w in report["waves"])
    assert outcomes["serving_new"] <= started < DEVICES
