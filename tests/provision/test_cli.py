"""The ``provision`` click group: bundle, claims, ports, device (over a pty to the CLI agent), errors."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgert.cli.provision import provision
from tests.mqtt.conftest import require_mosquitto
from tests.provision.site import Link, Site, make_site, stop_agent

pytestmark = pytest.mark.integration


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    require_mosquitto()
    s = make_site(tmp_path)
    yield s
    s.close()


def _agent_cli(link: Link, tmp: Path) -> subprocess.Popen[bytes]:
    code = "import sys; from edgert.cli.provision import provision; provision(sys.argv[1:])"
    args = [
        "agent",
        "--port",
        link.device_path,
        "--state-dir",
        str(tmp / "dev"),
        "--config",
        str(tmp / "etc" / "edgert.toml"),
        "--profile",
        "cpu-generic",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    assert b"agent ready" in proc.stderr.readline()
    return proc


def test_device_command_runs_the_flow_and_prints_a_summary(site: Site, tmp_path: Path) -> None:
    link = Link()
    agent = _agent_cli(link, tmp_path)
    try:
        r = CliRunner().invoke(
            provision,
            [
                "device",
                "--port",
                link.host_path,
                "--bundle",
                str(site.bundle_path),
                "--fleet-key",
                site.fleet_key,
                "--device-id",
                "gw-c",
            ],
        )
        assert r.exit_code == 0, r.output
        assert "device id         gw-c" in r.output
        assert "broker reachable  yes (device certificate)" in r.output
        assert "selftest latency" in r.output
        assert agent.wait(60) == 0  # locked: the agent is done
        assert agent.stderr is not None and b"provisioned; agent stopped" in agent.stderr.read()
    finally:
        stop_agent(agent)
        if agent.stderr:
            agent.stderr.close()
        link.close()


def test_bundle_create_and_claims_json(site: Site, tmp_path: Path) -> None:
    out = tmp_path / "b2.bundle"
    r = CliRunner().invoke(
        provision,
        [
            "bundle",
            "create",
            "--fleet",
            str(site.fleet.path),
            "--groups",
            "default",
            "--expires",
            "2h",
            "--uses",
            "3",
            "--broker",
            "mqtt.example.net:8883",
            "--claim-broker",
            "mqtt.example.net:8884",
            "--broker-ca",
            str(site.pki.ca_path),
            "-o",
            str(out),
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["uses"] == 3 and out.exists()
    assert doc["broker"] == {"host": "mqtt.example.net", "port": 8883, "protocol": "5", "tls": True}
    assert doc["claim_broker"]["port"] == 8884 and doc["claim_broker"]["tls"] is True
    assert doc["fleet_key"] == site.fleet_key
    r = CliRunner().invoke(provision, ["claims", "revoke", "--fleet", str(site.fleet.path), doc["claim"]])
    assert r.exit_code == 0
    rows = json.loads(
        CliRunner().invoke(provision, ["claims", "list", "--fleet", str(site.fleet.path), "--json"]).output
    )
    assert {r["id"]: r["revoked"] for r in rows}[doc["claim"]] is True
    assert all("secret" not in json.dumps(r) for r in rows)


def test_ports_json_lists_a_list() -> None:
    r = CliRunner().invoke(provision, ["ports", "--json"])
    assert r.exit_code == 0 and isinstance(json.loads(r.output), list)


def test_missing_port_error_names_next_step(site: Site) -> None:
    from edgert.errors import ProvisionError

    r = CliRunner().invoke(provision, ["info", "--port", "/dev/ttyUSB-nope"])
    assert isinstance(r.exception, ProvisionError) and "provision ports" in str(r.exception)
