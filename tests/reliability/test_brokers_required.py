"""Issue 8: in CI a missing mosquitto or rabbitmq-server must fail the broker tests, not skip them.

The real MQTT tests run in a nested pytest with the broker binary pointed at a path that does not
exist (EDGERT_TEST_MOSQUITTO / EDGERT_TEST_RABBITMQ_SERVER): on a developer machine they skip with
the install hint; with CI=true or EDGERT_REQUIRE_BROKERS=1 (tools/test.sh sets it) they fail loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MOSQUITTO_TESTS = (
    "tests/mqtt/test_broker_security.py::test_password_file_with_loose_mode_is_refused",  # `broker` fixture
    "tests/mqtt/test_daemon_e2e.py::test_status_and_telemetry_are_readable_with_mosquitto_sub",
)
RABBIT_TESTS = ("tests/mqtt/test_rabbitmq_compat.py",)
MISSING = "/nonexistent/edgert-test/broker"


def _pytest(targets: tuple[str, ...], **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in ("CI", "EDGERT_REQUIRE_BROKERS")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rsf", *targets],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("targets", "override"),
    [(MOSQUITTO_TESTS, "EDGERT_TEST_MOSQUITTO"), (RABBIT_TESTS, "EDGERT_TEST_RABBITMQ_SERVER")],
    ids=["mosquitto", "rabbitmq"],
)
def test_missing_broker_skips_on_a_developer_machine(targets: tuple[str, ...], override: str) -> None:
    r = _pytest(targets, **{override: MISSING})
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(targets)} skipped" in r.stdout, r.stdout
    assert "is not installed" in r.stdout and "install_test_brokers.sh" in r.stdout


@pytest.mark.parametrize("required", [{"CI": "true"}, {"EDGERT_REQUIRE_BROKERS": "1"}], ids=["CI", "env"])
@pytest.mark.parametrize(
    ("targets", "override"),
    [(MOSQUITTO_TESTS, "EDGERT_TEST_MOSQUITTO"), (RABBIT_TESTS, "EDGERT_TEST_RABBITMQ_SERVER")],
    ids=["mosquitto", "rabbitmq"],
)
def test_missing_broker_fails_loudly_when_required(
    targets: tuple[str, ...], override: str, required: dict[str, str]
) -> None:
    r = _pytest(targets, **{override: MISSING}, **required)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "skipped" not in r.stdout.splitlines()[-1], out
    assert "requires the real brokers" in out and MISSING in out, out
    assert "install_test_brokers.sh" in out
