"""Issue 9 B.4: a flood of unsigned MQTT commands must not fill the disk through the audit log.

The review sent 18,380 unsigned messages in 10 s; the audit log grew by 3.36 MB (one record per
refusal, about 27 GiB a day) and rotated files were never pruned. These tests drive the daemon's
real audit path (``open_daemon_audit`` behind a real :class:`CommandProcessor`) in-process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.device.commands import CommandProcessor
from edgert.device.compliance import DaemonAudit, open_daemon_audit
from edgert.mqtt.signing import sign_command
from edgert.security.audit import read_records, verify_dir
from edgert.security.keys import init_keystore, load_keystore
from edgert.security.store import ModelStore
from tests.security.kit import SMALL_ONNX, make_package, trusted

#: What the review sent and measured.
REVIEW_FLOOD = 18_380
REVIEW_GROWTH_BYTES = 3_360_000
#: The fixed log may grow by this much for the whole flood (a few summary records and checkpoints).
FLOOD_GROWTH_LIMIT = 16 * 1024
FLEET, DEVICE = "f1", "dev-a"
UNSIGNED = json.dumps({"v": 1, "body": "{}"}).encode()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0


@pytest.fixture
def state(tmp_path: Path) -> Path:
    root = tmp_path / "state"
    init_keystore(root / "keys")
    return root


def test_18380_unsigned_commands_add_a_bounded_number_of_records(state: Path) -> None:
    fleet_key = Ed25519PrivateKey.generate()
    audit = open_daemon_audit(state)
    assert audit.enabled
    audit.event("daemon_start", pid=1)
    before_records = len(list(read_records(state / "audit")))
    before_bytes = _dir_bytes(state / "audit")
    processor = CommandProcessor(fleet=FLEET, device=DEVICE, public_key=fleet_key.public_key(),
                                 audit=audit.event)
    t0 = time.monotonic()
    for _ in range(REVIEW_FLOOD):
        reply = processor.handle(UNSIGNED, now=time.time())
    elapsed = time.monotonic() - t0
    assert reply["ok"] is False and reply["error"]["code"] == "unsigned"
    # Accepted commands are still recorded one by one, during and after the flood.
    for i in range(5):
        signed = sign_command(fleet_key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time(),
                              args={"echo": str(i)})
        assert processor.handle(signed, now=time.time())["ok"] is True
    audit.close()

    growth = _dir_bytes(state / "audit") - before_bytes
    assert growth <= FLOOD_GROWTH_LIMIT, (
        f"{REVIEW_FLOOD} refusals grew the audit log by {growth} bytes (review: {REVIEW_GROWTH_BYTES})")
    from edgert.security.audit import REFUSAL_INTERVAL_S

    records = list(read_records(state / "audit"))[before_records:]
    refused = [r["data"] for r in records if r["event"] == "mqtt.command.refused"]
    windows = 1 + int(elapsed // REFUSAL_INTERVAL_S)
    assert len(refused) <= 2 * windows, refused  # the first of a window as is, then one summary
    assert sum(d.get("count", 1) for d in refused) == REVIEW_FLOOD  # counted, none lost
    assert {d["reason"] for d in refused} == {"unsigned"}
    assert [r["data"]["cmd"] for r in records if r["event"] == "mqtt.command.accepted"] == ["ping"] * 5
    assert verify_dir(state / "audit", load_keystore(state / "keys").sign_public).ok


def test_a_tiny_budget_keeps_the_directory_under_it_and_appends_working(state: Path) -> None:
    from edgert.security.audit import AuditLog

    budget = 64 * 1024
    keys = load_keystore(state / "keys")
    log = AuditLog(state / "audit", keys.sign, max_total_bytes=budget)
    audit = DaemonAudit(log)
    largest = 0
    for i in range(6_000):  # about 1 MB of records: 16 times the budget
        audit.event("model_load", model=f"m{i % 7}", version=str(i), source="store", provider="cpu")
        if i % 250 == 0:
            largest = max(largest, _dir_bytes(state / "audit"))
    audit.event("daemon_stop", pid=1)
    audit.close()
    largest = max(largest, _dir_bytes(state / "audit"))
    assert largest <= budget, f"audit directory reached {largest} bytes with a {budget}-byte budget"
    records = list(read_records(state / "audit"))
    assert records[-2]["event"] == "daemon_stop"  # appends kept working to the end
    pruned = [r["data"] for r in records if r["event"] == "audit_pruned"]
    assert pruned and all({"first", "last", "first_h", "last_h", "file"} <= d.keys() for d in pruned)
    report = verify_dir(state / "audit", keys.sign_public)
    assert report.ok, report
    assert report.first_index > 0  # the oldest records were pruned, and the log says so


def test_the_store_keeps_installing_when_the_audit_budget_is_reached(state: Path, tmp_path: Path) -> None:
    from edgert.security.audit import AuditLog

    budget = 32 * 1024
    keys = load_keystore(state / "keys")
    log = AuditLog(state / "audit", keys.sign, max_total_bytes=budget)
    for i in range(3_000):  # the budget is reached many times over
        log.append("mqtt.command.accepted", cmd="ping", nonce=f"{i:032x}")
    store = ModelStore(state / "models", keys, audit=log, trusted=trusted())
    for version in ("1", "2"):
        pkg = tmp_path / f"digits-{version}.edgepkg"
        pkg.write_bytes(make_package(SMALL_ONNX, [keys], version=version))
        store.install(pkg)
    assert store.entry("digits").active == "2"
    log.close()
    assert _dir_bytes(state / "audit") <= budget
    installs = [r["data"]["version"] for r in read_records(state / "audit") if r["event"] == "model_install"]
    assert installs == ["1", "2"]
    assert verify_dir(state / "audit", keys.sign_public).ok


def test_daemon_audit_status_carries_the_signed_head(state: Path) -> None:
    from edgert.security.audit_chain import verify_head

    audit = open_daemon_audit(state)
    audit.event("daemon_start", pid=1)
    for _ in range(10):
        audit.event("mqtt.command.refused", reason="unsigned", bytes=22)
    status = audit.status()
    assert status["enabled"] is True and status["refusals_pending"] == 9
    head = status["head"]
    assert head == audit.head() and verify_head(head, load_keystore(state / "keys").sign_public) is None
    audit.close()
    assert audit.status() == {"enabled": False, "head": None}
    assert DaemonAudit(None).head() is None
