"""Signed desired-state documents, and the rollout CLI commands (db side; serve is covered with a broker)."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.cli.fleet_rollout import register
from edgert.errors import SignatureError
from edgert.fleet import docs_sign
from edgert.fleet.db import open_db


def test_documents_sign_and_verify_and_refuse_tampering() -> None:
    key = Ed25519PrivateKey.generate()
    doc = docs_sign.desired_state(
        fleet="f1",
        seq=7,
        rollout="r1",
        model="digits",
        version="2",
        issued=1795462252,
        shadow_percent=10,
        wave=1,
    )
    assert doc["target"] == "models/digits/2.edgepkg" and doc["shadow"] == {"percent": 10.0}
    signed = docs_sign.sign_document(doc, key)
    wire = docs_sign.encode(signed)
    assert docs_sign.verify_document(wire, key.public_key())["seq"] == 7
    assert docs_sign.canonical_bytes(signed) == docs_sign.canonical_bytes(doc)  # "sig" is not signed
    for change in ({"seq": 8}, {"version": "3"}, {"sig": signed["sig"][:-4] + "AAA="}, {"sig": "%%%"}):
        with pytest.raises(SignatureError):
            docs_sign.verify_document({**signed, **change}, key.public_key())
    with pytest.raises(SignatureError):
        docs_sign.verify_document(wire, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(SignatureError):
        docs_sign.verify_document(b"[" * 100_000, key.public_key())


@pytest.fixture
def cli() -> click.Group:
    @click.group()
    def fleet() -> None:
        """test group"""

    register(fleet)
    return fleet


def run(cli: click.Group, *args: str, ok: bool = True) -> str:
    res = CliRunner().invoke(cli, list(args), catch_exceptions=True)
    if ok:
        assert res.exit_code == 0, (res.output, res.exception)
    return res.output if ok else str(res.exception)


def test_cli_deploy_pause_resume_rollback_status(cli: click.Group, tmp_path: Path) -> None:
    db_path = str(tmp_path / "fleet.sqlite")
    base = ["--fleet-id", "f1", "--db", db_path]
    assert set(cli.commands) == {"deploy", "rollback", "pause", "resume", "status", "serve"}
    out = run(
        cli,
        "deploy",
        *base,
        "--group",
        "g",
        "--model",
        "digits",
        "--version",
        "2",
        "--device",
        "d1",
        "--device",
        "d2",
        "--waves",
        "50%,100%",
        "--wait-healthy",
        "5m",
        "--max-failure-rate",
        "5%",
        "--json",
    )
    doc = json.loads(out)
    assert doc["devices"] == 2 and doc["previous_version"] is None
    rid = doc["rollout"]
    # A second rollout of the same model to the group is refused while one is active.
    msg = run(cli, "deploy", *base, "--group", "g", "--model", "digits", "--version", "3", ok=False)
    assert "still active" in msg
    assert "--shadow needs" in run(
        cli, "deploy", *base, "--group", "h", "--model", "m", "--version", "1", "--shadow", "10%", ok=False
    )
    assert rid in run(cli, "pause", *base, "--group", "g")
    db = open_db(db_path)
    assert db.rollout(rid).state == "paused"  # type: ignore[union-attr]
    assert rid in run(cli, "resume", *base, "--group", "g")
    assert db.rollout(rid).state == "running"  # type: ignore[union-attr]
    r = db.rollout(rid)
    assert r is not None and r.waves == (0.5, 1.0) and r.wait_healthy_s == 300 and r.max_failure_rate == 0.05
    # No previous version: rollback explains itself.
    assert "no previous version" in run(cli, "rollback", *base, "--group", "g", "--model", "digits", ok=False)
    db.record_status("f1", "d1", online=True, versions={"digits": "1"}, now=1.0)
    db.record_telemetry("f1", "d1", p99={"digits": 0.004}, now=2.0)
    db.close()
    rep = json.loads(run(cli, "status", *base, "--group", "g", "--json"))
    assert rep["rollouts"][0]["id"] == rid and rep["rollouts"][0]["state"] == "running"
    assert rep["devices"]["d1"]["versions"] == {"digits": "1"} and rep["devices"]["d1"]["p99"] == {
        "digits": 0.004
    }
    text = run(cli, "status", *base, "--group", "g")
    assert "d1" in text and "4.00" in text and "digits=1" in text
    assert "invalid" in run(
        cli, "deploy", *base, "--group", "g/#", "--model", "x", "--version", "1", ok=False
    )
    assert "must increase" in run(
        cli,
        "deploy",
        *base,
        "--group",
        "g2",
        "--model",
        "x",
        "--version",
        "1",
        "--waves",
        "50%,10%",
        ok=False,
    )
