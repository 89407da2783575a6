"""Shadow evaluation end to end: mosquitto, `edgert fleet serve`, a real `edgert daemon` with live traffic.

`edgert fleet deploy --shadow 50% --min-agreement 0.9 --max-latency-ratio 5`: the device installs digits 2
and runs it as a shadow of digits 1 on every second request while a client keeps sending digits; callers
are answered by version 1 only; the device reports its agreement; the controller promotes; the device
then serves version 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.client import Client
from edgert.fleet.db import open_db
from edgert.runtime import Runtime
from tests.device.models_kit import MODELS
from tests.fleet.test_fleet_e2e import FLEET, GROUP, READY_TIMEOUT_S, UPDATE_TIMEOUT_S, Device, _ok
from tests.fleet.test_fleet_e2e import rig as e2e_rig
from tests.mqtt.conftest import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


#: Pause between two requests of the client, so the 2-core test machine is not saturated (pacing only).
PACE_S = 0.003


class Traffic:
    """A client sending the digits test set in a loop over the daemon's socket; keeps every answer."""

    def __init__(self, sock: Path) -> None:
        self.sock, self.x = sock, np.load(MODELS / "digits_test.npz")["x"]
        self.answers: list[tuple[int, np.ndarray]] = []  # (row, logits), in order
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Client(f"unix://{self.sock}") as c:
            i = 0
            while not self.stop.wait(PACE_S):
                row = i % len(self.x)
                try:
                    out = c.infer("digits", {"pixels": self.x[row:row + 1]})["logits"]
                except Exception as exc:  # a caller must never see the shadow fail
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self.answers.append((row, out))
                i += 1


rig = e2e_rig  # the fixture: mosquitto, a fleet directory, and the processes to stop


def test_shadow_rollout_reports_and_promotes(rig: Any) -> None:
    tmp, broker, fleet, procs = rig
    _ok("fleet", "init", str(fleet), "--id", FLEET, "--broker-port", str(broker.port))
    dev = Device(tmp, "dev-1", fleet, broker.port)
    _ok("fleet", "devices", "add", "dev-1", "--fleet", str(fleet), "--groups", GROUP, "--x25519", dev.x25519)
    _ok("fleet", "model", "add", str(MODELS / "digits_large_int8.onnx"), "--fleet", str(fleet),
        "--name", "digits", "--version", "2", "--groups", GROUP)
    procs.append(dev)
    dev.start()
    assert dev.served() == "1"
    traffic = Traffic(dev.sock)
    traffic.thread.start()
    log = open(tmp / "controller.log", "ab")
    controller = subprocess.Popen([sys.executable, "-m", "edgert.cli.main", "fleet", "serve", "--fleet",
                                   str(fleet)], stdout=subprocess.DEVNULL, stderr=log,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    procs.append(controller)
    db = open_db(fleet / "fleet.sqlite")
    try:
        wait_for(lambda: len(json.loads(_ok("fleet", "status", "--fleet", str(fleet), "--json"))["devices"]),
                 timeout=READY_TIMEOUT_S, what="the device in the fleet status")
        rollout = json.loads(_ok("fleet", "deploy", "--fleet", str(fleet), "--group", GROUP, "--model",
                                 "digits", "--version", "2", "--shadow", "50%", "--min-agreement", "0.9",
                                 "--max-latency-ratio", "5", "--wait-healthy", "90s", "--json"))

        def gate() -> bool:
            assert controller.poll() is None, (tmp / "controller.log").read_text()[-3000:]
            assert not traffic.errors, traffic.errors[:3]
            r = db.rollout(rollout["rollout"])
            assert r is not None and r.state != "halted", r.reason
            return any(e["kind"] == "shadow-passed" for e in db.events(FLEET, rollout=rollout["rollout"]))

        wait_for(gate, timeout=UPDATE_TIMEOUT_S, what="the shadow gate to pass")
        before_promotion = len(traffic.answers)  # all of these were answered before the promotion existed
        wait_for(lambda: dev.served() == "2", timeout=UPDATE_TIMEOUT_S, what="digits 2 serving (promoted)")
        after = len(traffic.answers)
        wait_for(lambda: len(traffic.answers) >= after + 20, timeout=UPDATE_TIMEOUT_S,
                 what="traffic after promotion")
        wait_for(lambda: db.rollout(rollout["rollout"]).state == "complete",  # type: ignore[union-attr]
                 timeout=UPDATE_TIMEOUT_S, what="the rollout to complete")
    finally:
        traffic.stop.set()
        traffic.thread.join(30)
    assert not traffic.errors, traffic.errors[:3]
    assert dev.store_active() == "2"
    (passed,) = [e for e in db.events(FLEET, rollout=rollout["rollout"]) if e["kind"] == "shadow-passed"]
    shadow = [r for r in db.rollout_devices(rollout["rollout"])]
    db.close()
    print(f"\ncontroller: {passed['body']['detail']}; device rows: {shadow}; "
          f"{before_promotion} requests answered before the promotion")
    assert before_promotion > 100
    # Every caller before the promotion got version 1's outputs: the shadow never answered anyone.
    small = Runtime("cpu-generic").load(MODELS / "digits_small_int8.onnx")
    large = Runtime("cpu-generic").load(MODELS / "digits_large_int8.onnx")
    x = traffic.x
    for row, out in traffic.answers[:before_promotion]:
        np.testing.assert_array_equal(out, small.run({"pixels": x[row:row + 1]})["logits"])
    for row, out in traffic.answers[after:]:
        np.testing.assert_array_equal(out, large.run({"pixels": x[row:row + 1]})["logits"])
    logs = [json.loads(line) for line in dev.log().splitlines() if line.startswith("{")]
    assert not [r for r in logs if r.get("level") == "error"]
