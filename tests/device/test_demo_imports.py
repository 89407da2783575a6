"""What a ready ``edgert demo`` has loaded (issue 10, demo RSS): a count and a deny-list, never a time.

Every module a daemon imports stays in memory for its lifetime (~2 kB to ~1 MB each), so code the
demo never runs must not be imported at start. The probe runs the real demo command in a fresh
interpreter, and when the daemon reports ready (the demo's usage text is printed) it records
``sys.modules``, the Python threads and the onnxruntime telemetry setting, then exits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = 120.0
#: edgert's own modules loaded by a ready demo (90 in December 2026). Raise it only with a reason:
#: each module costs resident memory for the daemon's lifetime.
EDGERT_MODULES_MAX = 95
#: Features the demo does not run. Each is imported by the command or the config that enables it.
NOT_IN_DEMO = (
    "paho", "tuf", "securesystemslib", "wsproto", "websockets", "serial", "sqlite3", "email",
    "http.client", "edgert.mqtt", "edgert.fleet", "edgert.provision", "edgert.device.sync",
    "edgert.device.updater", "edgert.device.repo_fetcher", "edgert.device.telemetry", "edgert.device.shadow",
    "edgert.drift.reference", "edgert.serve.ws_streams", "edgert.client",
)

_PROBE = """
import json, os, sys, threading
import edgert.device.demo as demo

def _ready(*args):
    print(json.dumps({
        "modules": sorted(sys.modules),
        "threads": sorted(t.name for t in threading.enumerate()),
        "ort_telemetry_env": os.environ.get("ORT_DISABLE_TELEMETRY"),
    }), flush=True)
    os._exit(0)

demo.demo_usage = _ready  # the demo calls it once the daemon is ready
from edgert.cli.main import main
main(["demo", "--http", "127.0.0.1:0", "--socket", sys.argv[1]])
"""


@pytest.fixture(scope="module")
def ready_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("demo-imports")
    # The probe exits without the demo's cleanup: its state dir (a device key) goes under tmp.
    # The suite sets ORT_DISABLE_TELEMETRY for itself (tests/conftest.py); the demo must set it alone.
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["TMPDIR"] = str(tmp)
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, str(tmp / "edgert.sock")],
        capture_output=True, text=True, timeout=PROBE_TIMEOUT_S, cwd=str(tmp), env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith('{"modules"')]
    assert lines, f"the demo never became ready: {out.stderr[-2000:]}"
    result: dict = json.loads(lines[-1])
    return result


def test_probe_sees_the_serving_daemon(ready_demo: dict) -> None:
    # Proves the lists below come from a daemon that loaded models and serves, not an empty process.
    for needed in ("edgert.device.daemon", "edgert.serve.http_server", "edgert.serve.uds", "onnxruntime"):
        assert needed in ready_demo["modules"]


def test_demo_imports_no_feature_it_does_not_run(ready_demo: dict) -> None:
    loaded = [m for m in ready_demo["modules"] if any(m == n or m.startswith(n + ".") for n in NOT_IN_DEMO)]
    assert loaded == []


def test_demo_edgert_module_count_is_bounded(ready_demo: dict) -> None:
    own = [m for m in ready_demo["modules"] if m == "edgert" or m.startswith("edgert.")]
    assert len(own) <= EDGERT_MODULES_MAX, own


def test_onnxruntime_telemetry_is_off_in_the_demo(ready_demo: dict) -> None:
    assert ready_demo["ort_telemetry_env"] == "1"
