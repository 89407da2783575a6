"""Replay protection across restarts (persistent nonce store), message size limits, the log tail, and
publishing from many threads over TLS (paho thread safety) against a real mosquitto."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.device.commands import CommandProcessor
from edgert.device.logtail import LogRing
from edgert.device.sync import MAX_SPOOLED_BYTES, SyncService
from edgert.device.telemetry import build_telemetry
from edgert.errors import SyncError
from edgert.mqtt.client import MAX_PAYLOAD_BYTES, MqttLink
from edgert.mqtt.nonces import BUSY_TIMEOUT_S, PersistentNonceCache
from edgert.mqtt.signing import CLOCK_SKEW_S, CommandRejected, sign_command
from edgert.mqtt.spool import Spool
from tests.brokers import Mosquitto
from tests.mqtt.conftest import DEVICE, FLEET, Recorder, make_config, wait_for

KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0
CMD = f"edgert/v1/{FLEET}/devices/{DEVICE}/cmd"


def _processor(path: Path, now: float = NOW) -> tuple[CommandProcessor, PersistentNonceCache]:
    cache = PersistentNonceCache(path, now=now)
    return CommandProcessor(FLEET, DEVICE, KEY.public_key(), nonces=cache), cache


# -- persistent nonces (pure SQLite, no broker) ---------------------------------------------------


def test_captured_command_is_refused_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "nonces.sqlite"
    captured = sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW, ttl=300)
    proc, cache = _processor(path)
    assert proc.handle(captured, now=NOW + 1)["ok"] is True
    cache.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    proc, cache = _processor(path, NOW + 5)  # the daemon restarted
    reply = proc.handle(captured, now=NOW + 10)
    assert reply["ok"] is False and reply["error"]["code"] == "replayed"
    fresh = sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW + 10)
    assert proc.handle(fresh, now=NOW + 10)["ok"] is True
    cache.close()


def test_nonce_store_prunes_expired_and_is_bounded(tmp_path: Path) -> None:
    cache = PersistentNonceCache(tmp_path / "n.sqlite", now=NOW, max_entries=2)
    cache.check_and_add("a" * 16, NOW + 10, NOW)
    cache.check_and_add("b" * 16, NOW + 10, NOW)
    with pytest.raises(CommandRejected) as busy:
        cache.check_and_add("c" * 16, NOW + 10, NOW)
    assert busy.value.code == "busy"
    with pytest.raises(CommandRejected) as again:
        cache.check_and_add("a" * 16, NOW + 10, NOW)
    assert again.value.code == "replayed"
    # Once both expired (plus the skew) they are pruned and room frees up.
    cache.check_and_add("c" * 16, NOW + 500, NOW + 10 + CLOCK_SKEW_S + 1)
    assert len(cache) == 1
    cache.close()


def test_corrupt_nonce_store_is_rebuilt_and_fails_closed_for_older_commands(tmp_path: Path) -> None:
    path = tmp_path / "n.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    proc, cache = _processor(path, NOW)
    assert cache.rebuilt and cache.floor == NOW + CLOCK_SKEW_S
    assert list(tmp_path.glob("n.sqlite.corrupt-*")), "the corrupt file is kept for inspection"
    old = sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW - 30, ttl=300)
    assert proc.handle(old, now=NOW + 1)["error"]["code"] == "replayed"
    later = sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW + CLOCK_SKEW_S + 1)
    assert proc.handle(later, now=NOW + CLOCK_SKEW_S + 2)["ok"] is True
    cache.close()
    # The floor itself persists across a restart.
    _, cache = _processor(path, NOW + 100)
    assert cache.floor == NOW + CLOCK_SKEW_S and not cache.rebuilt
    cache.close()


_EXCLUSIVE_LOCKER = r"""
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
db.close()
"""


def test_nonce_store_locked_by_another_process_is_not_rebuilt(tmp_path: Path) -> None:
    """A lock is not corruption: before, the store was set aside and every earlier command refused."""
    path = tmp_path / "n.sqlite"
    proc, cache = _processor(path)
    cache.close()
    hold_s = 2 * BUSY_TIMEOUT_S  # longer than SQLite's own wait, within the bounded retries
    locker = subprocess.Popen([sys.executable, "-c", _EXCLUSIVE_LOCKER, str(path), str(hold_s)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        proc, cache = _processor(path, NOW + 5)
    finally:
        locker.communicate(timeout=60)
    assert not cache.rebuilt and cache.floor == 0.0
    assert not list(tmp_path.glob("n.sqlite.corrupt-*"))
    issued_before = sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW, ttl=300)
    assert proc.handle(issued_before, now=NOW + 10)["ok"] is True
    cache.close()


def test_unwritable_nonce_store_refuses_commands(tmp_path: Path) -> None:
    proc, cache = _processor(tmp_path / "n.sqlite")
    cache._db.close()  # any sqlite3 error on write, e.g. disk full or I/O error
    reply = proc.handle(sign_command(KEY, cmd="ping", fleet=FLEET, device=DEVICE, now=NOW), now=NOW)
    assert reply["ok"] is False and reply["error"]["code"] == "busy"


# -- size limits (pure) ---------------------------------------------------------------------------


def test_one_huge_model_entry_is_truncated_under_the_limit() -> None:
    models = {
        "m": {"requests": 3, "errors": {f"reason-{i}": i for i in range(20_000)}, "latency_sketch": [1]}
    }
    parts = build_telemetry(
        device="d", boot_id="b", seq=1, ts=1.0, interval_s=60, models=models, device_stats={}, sync_stats={}
    )
    assert len(parts) == 1 and len(parts[0]) <= MAX_SPOOLED_BYTES
    entry = json.loads(parts[0])["models"]["m"]
    assert entry == {"requests": 3, "truncated": True}


def test_log_ring_keeps_a_bounded_tail_of_edgert_records() -> None:
    ring = LogRing(capacity=3)
    logger = logging.getLogger("edgert.test.ring")
    logger.setLevel(logging.INFO)
    ring.attach()
    try:
        for i in range(5):
            logger.info("line %d", i, extra={"n": i})
    finally:
        ring.detach()
    logger.info("after detach")
    lines = [json.loads(x) for x in ring.tail(10)]
    assert [d["msg"] for d in lines] == ["line 2", "line 3", "line 4"]
    assert ring.tail(1) == ring.tail(10)[-1:]


# -- against a real broker --------------------------------------------------------------------------


@pytest.mark.integration
def test_oversized_messages_are_refused_and_never_block_the_spool(tmp_path: Path, broker: Mosquitto) -> None:
    rec = Recorder(broker.port)
    cfg = make_config(tmp_path, broker.port, telemetry_interval=3600)
    # A spool written by something that did not check the size: an oversized record sits first in line.
    assert cfg.sync.spool_path is not None
    spool = Spool(cfg.sync.spool_path, cfg.sync.spool_max_records)
    spool.enqueue(
        f"edgert/v1/{FLEET}/devices/{DEVICE}/events", b"{" + b" " * (MAX_PAYLOAD_BYTES + 10) + b"}", 1.0
    )
    spool.enqueue(f"edgert/v1/{FLEET}/devices/{DEVICE}/events", b'{"after":1}', 2.0)
    spool.close()
    svc = SyncService(cfg)
    with pytest.raises(SyncError, match="limited to"):
        svc.emit_event(b"{" + b" " * MAX_SPOOLED_BYTES + b"}")
    assert svc.spool.pending == 2, "a refused event is not spooled"
    with pytest.raises(SyncError, match="limit is"):
        svc.link.publish("edgert/x", b"x" * (MAX_PAYLOAD_BYTES + 1))
    svc.start()
    try:
        wait_for(lambda: rec.on("/events"), what="the record behind the oversized one")
        assert [json.loads(m.payload)["after"] for m in rec.on("/events")] == [1]
        assert svc.spool.rejected()[0]["reason_code"] == 0x95
        assert svc.spool.pending == 0
    finally:
        svc.stop()
        rec.close()


@pytest.mark.integration
def test_replay_after_service_restart_is_refused_through_the_broker(
    tmp_path: Path, broker: Mosquitto, command_key: Any
) -> None:
    key, pub = command_key
    rec = Recorder(broker.port)
    captured = sign_command(key, cmd="ping", fleet=FLEET, device=DEVICE, now=time.time(), ttl=300)

    def run_once() -> dict[str, Any]:
        replies, statuses = len(rec.on("/reply")), len(rec.on("/status"))
        svc = SyncService(
            make_config(tmp_path, broker.port, command_key_file=str(pub), telemetry_interval=3600)
        )
        svc.start()
        try:
            # on_connect subscribes to cmd, then publishes "online": once that arrives, commands get through.
            wait_for(
                lambda: any(json.loads(m.payload)["state"] == "online" for m in rec.on("/status")[statuses:]),
                what="online status",
            )
            rec.publish(CMD, captured)
            wait_for(lambda: len(rec.on("/reply")) > replies, what="reply")
            return dict(json.loads(rec.on("/reply")[-1].payload))
        finally:
            svc.stop()

    assert run_once()["ok"] is True
    second = run_once()
    assert second["ok"] is False and second["error"]["code"] == "replayed"
    rec.close()


@pytest.mark.integration
def test_publishing_from_many_threads_over_mutual_tls(
    tmp_path: Path, mtls_broker: Mosquitto, pki: dict[str, Any]
) -> None:
    cert, key = pki[DEVICE]
    cfg = make_config(
        tmp_path, mtls_broker.port, ca_file=str(pki["ca"].path), cert_file=str(cert), key_file=str(key)
    )
    acked: set[int] = set()
    lock = threading.Lock()

    def on_puback(mid: int, code: int, reason: str) -> None:
        with lock:
            acked.add(mid)

    rec = Recorder(mtls_broker.port, tls=(pki["ca"].path, *pki["fleet"]))
    link = MqttLink(cfg.broker, on_puback=on_puback)
    link.start()
    mids: list[int] = []
    try:
        assert link.wait_connected(10), link.last_error

        def burst(t: int) -> None:
            for i in range(300):
                mid = link.publish(f"edgert/v1/{FLEET}/devices/{DEVICE}/events", json.dumps([t, i]).encode())
                with lock:
                    mids.append(mid)

        threads = [threading.Thread(target=burst, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: acked >= set(mids), what="every publish acknowledged")
        wait_for(lambda: len(rec.on("/events")) >= 1200, what="every message delivered")
        got = [tuple(json.loads(m.payload)) for m in rec.on("/events")]
        assert sorted(got) == sorted((t, i) for t in range(4) for i in range(300))
        for t in range(4):  # per publishing thread, order is kept
            assert [i for tt, i in got if tt == t] == list(range(300))
        assert link.connects == 1, "the TLS stream was never corrupted into a reconnect"
    finally:
        link.stop()
        rec.close()
