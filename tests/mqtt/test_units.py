"""Pure-logic tests: topics, [mqtt] config, command signing, spool, telemetry documents, backoff."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from edgert.device.commands import CommandProcessor
from edgert.device.sync_config import MqttSettings
from edgert.device.telemetry import MAX_MESSAGE_BYTES, DeviceStats, build_telemetry
from edgert.errors import ConfigError, SyncError
from edgert.mqtt import topics
from edgert.mqtt.client import Backoff, certificate_problem
from edgert.mqtt.signing import CommandRejected, NonceCache, sign_command, verify_command
from edgert.mqtt.spool import Spool

# -- topics ---------------------------------------------------------------------------------------


def test_topics_build_and_parse() -> None:
    t = topics.device_topic("f1", "dev-a", "telemetry")
    assert t == "edgert/v1/f1/devices/dev-a/telemetry"
    p = topics.parse_topic(t)
    assert (p.kind, p.fleet, p.device, p.channel) == ("device", "f1", "dev-a", "telemetry")
    assert topics.parse_topic(topics.deployment_topic("f1", "canary")).group == "canary"
    assert topics.parse_topic(topics.repo_topic("f1", "metadata", "1.root.json")).path == (
        "metadata",
        "1.root.json",
    )


@pytest.mark.parametrize("bad", ["+", "#", "a/b", "..", ".", "", "$SYS", "a b", "x\0", "é", "a" * 65])
def test_topics_reject_wildcards_and_path_tricks(bad: str) -> None:
    with pytest.raises(SyncError, match="invalid device id"):
        topics.device_topic("f1", bad, "status")


def test_parse_rejects_foreign_and_wildcard_topics() -> None:
    for t in [
        "edgert/v1/f1/devices/+/cmd",
        "edgert/v2/f1/devices/d/cmd",
        "edgert/v1/f1/devices/d/other",
        "edgert/v1/#",
        "edgert/v1/f1/devices/../cmd",
    ]:
        with pytest.raises(SyncError):
            topics.parse_topic(t)
    with pytest.raises(SyncError):
        topics.device_topic("f1", "d", "secrets")


@given(st.text(min_size=1, max_size=80))
def test_any_accepted_id_is_one_safe_level(s: str) -> None:
    try:
        topics.check_id(s)
    except SyncError:
        return
    assert not set(s) & set("/+#$\0 ") and s not in (".", "..")


# -- config ---------------------------------------------------------------------------------------


def test_config_defaults_and_errors() -> None:
    cfg = MqttSettings.from_dict({"host": "b", "fleet": "f", "device_id": "d"}, "x.toml")
    got = (cfg.broker.port, cfg.broker.protocol, cfg.broker.client_id, cfg.sync.telemetry_interval)
    assert got == (1883, "5", "edgert-d", 60.0)
    tls = MqttSettings.from_dict({"host": "b", "fleet": "f", "device_id": "d", "ca_file": "/ca"})
    assert tls.broker.port == 8883
    cases = [
        ({"host": "b", "fleet": "f"}, "mqtt.device_id: is required"),
        ({"host": "b", "fleet": "f", "device_id": "d/x"}, "invalid device_id"),
        ({"host": "b", "fleet": "f", "device_id": "d", "protocol": "4"}, r"allowed: 5, 3\.1\.1"),
        ({"host": "b", "fleet": "f", "device_id": "d", "port": 0}, r"port: must be an integer in 1\.\.65535"),
        ({"host": "b", "fleet": "f", "device_id": "d", "bogus": 1}, "mqtt.bogus: is not a known key"),
        ({"host": "b", "fleet": "f", "device_id": "d", "cert_file": "c"}, "given together"),
        ({"host": "b", "fleet": "f", "device_id": "d", "cert_file": "c", "key_file": "k"}, "need TLS"),
        ({"host": "b", "fleet": "f", "device_id": "d", "clean_session": "yes"}, "true or false"),
        ({"host": "b", "fleet": "f", "device_id": "d", "telemetry_interval": 0}, "telemetry_interval"),
    ]
    for raw, msg in cases:
        with pytest.raises(ConfigError, match=msg) as exc:
            MqttSettings.from_dict(raw, "x.toml")
        assert "x.toml" in exc.value.message


# -- signing --------------------------------------------------------------------------------------
KEY = Ed25519PrivateKey.generate()
NOW = 1_800_000_000.0


def _verify(payload: bytes, now: float = NOW, nonces: NonceCache | None = None, device: str = "d1") -> str:
    try:
        verify_command(
            payload, KEY.public_key(), fleet="f1", device=device, now=now, nonces=nonces or NonceCache()
        )
    except CommandRejected as exc:
        return exc.code
    return "ok"


def test_signed_command_roundtrip_and_refusals() -> None:
    good = sign_command(KEY, cmd="ping", fleet="f1", device="d1", now=NOW, args={"a": 1})
    nonces = NonceCache()
    assert _verify(good, nonces=nonces) == "ok"
    assert _verify(good, nonces=nonces) == "replayed"
    assert _verify(good, now=NOW + 61) == "expired"
    assert _verify(good, device="d2") == "wrong_device"
    env = json.loads(good)
    env["body"] = env["body"].replace('"ping"', '"reboot-daemon"')
    assert _verify(json.dumps(env).encode()) == "bad_signature"
    other = sign_command(Ed25519PrivateKey.generate(), cmd="ping", fleet="f1", device="d1", now=NOW)
    assert _verify(other) == "bad_signature"
    assert _verify(sign_command(KEY, cmd="ping", fleet="f1", device="d1", now=NOW, ttl=3600)) == "bad_time"
    assert _verify(sign_command(KEY, cmd="ping", fleet="f1", device="d1", now=NOW + 3600)) == "bad_time"
    env = json.loads(good)
    del env["sig"]
    assert _verify(json.dumps(env).encode()) == "unsigned"
    env["sig"] = "!!!"
    assert _verify(json.dumps(env).encode()) == "bad_signature"
    assert _verify(b"[]") == "malformed"
    assert _verify(b'{"v":7}') == "bad_version"
    assert _verify(b"x" * 70_000) == "too_large"
    # nesting bombs under the size limit: json raises RecursionError, which must be "malformed"
    assert _verify(b"[" * 60_000) == "malformed"
    assert _verify(b"{\"a\":" * 10_000 + b"1" + b"}" * 10_000) == "malformed"


def test_nonce_cache_is_bounded_without_evicting_live_nonces() -> None:
    cache = NonceCache(max_entries=2)
    cache.check_and_add("a" * 16, NOW + 10, NOW)
    cache.check_and_add("b" * 16, NOW + 10, NOW)
    with pytest.raises(CommandRejected, match="too many"):
        cache.check_and_add("c" * 16, NOW + 10, NOW)
    cache.check_and_add("c" * 16, NOW + 500, NOW + 100)  # the first two expired and were purged


# -- spool ----------------------------------------------------------------------------------------


def test_spool_orders_drops_oldest_when_full_and_persists_counters(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    sp = Spool(path, 5)
    ids = [sp.enqueue("t", json.dumps({"i": i}).encode(), float(i)) for i in range(8)]
    assert [json.loads(r.payload)["i"] for r in sp.peek(0, 10)] == [3, 4, 5, 6, 7]
    assert sp.stats()["dropped_full"] == 3
    sp.ack(ids[3])
    sp.ack_many([ids[4], ids[5]])
    sp.reject(ids[6], 0x87, "Not authorized")
    assert sp.pending == 1 and sp.rejected()[0]["reason_code"] == 0x87
    sp.close()
    again = Spool(path, 5)
    assert again.pending == 1 and again.stats()["dropped_full"] == 3 and again.stats()["rejected"] == 1
    assert again.peek(0, 10)[0].ts == 7.0  # original timestamp kept
    again.close()


def test_spool_corrupt_file_is_rebuilt_and_loss_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    sp = Spool(path, 100)
    for i in range(10):
        sp.enqueue("t", b"{}", float(i))
    sp.close()
    path.write_bytes(b"this is not a database" * 100)
    rebuilt = Spool(path, 100)
    stats = rebuilt.stats()
    assert stats["rebuilds"] == 1 and stats["lost_unknown"] == 1 and stats["pending"] == 0
    assert list(tmp_path.glob("s.sqlite.corrupt-*"))  # kept aside for inspection
    assert rebuilt.enqueue("t", b"{}", 1.0) is not None
    rebuilt.close()


def test_spool_disk_full_drops_oldest_and_keeps_newest(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "s.sqlite", 100_000)
    sp._db.execute("PRAGMA max_page_count=10")  # SQLite then fails with SQLITE_FULL, as on a full disk
    last = None
    for i in range(50):
        last = sp.enqueue("t", json.dumps({"i": i, "pad": "x" * 3000}).encode(), float(i))
    assert last is not None
    stats = sp.stats()
    assert stats["dropped_disk_full"] > 0 and stats["pending"] + stats["dropped_disk_full"] == 50
    assert json.loads(sp.peek(0, 100)[-1].payload)["i"] == 49
    sp.close()


def test_spool_disk_full_injected_error(tmp_path: Path) -> None:
    """An injected ENOSPC-style sqlite error on every write: the record is counted, nothing raises."""

    class FullConnection(sqlite3.Connection):
        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
            if sql.startswith("INSERT INTO spool"):
                raise sqlite3.OperationalError("database or disk is full")
            return super().execute(sql, *args)  # type: ignore[arg-type]

    sp = Spool(
        tmp_path / "s.sqlite",
        10,
        connect=lambda p: sqlite3.connect(
            p, check_same_thread=False, isolation_level=None, factory=FullConnection
        ),
    )
    assert sp.enqueue("t", b"{}", 1.0) is None
    assert sp.stats()["dropped_disk_full"] == 1
    sp.close()


# -- telemetry ------------------------------------------------------------------------------------


def test_telemetry_splits_large_model_sets_under_the_limit() -> None:
    models = {
        f"m{i}": {
            "requests": i,
            "latency_s": {"p50": 0.001},
            "latency_sketch": {"bins": list(range(800))},
            "nan": float("nan"),
        }
        for i in range(60)
    }
    parts = build_telemetry(
        device="d", boot_id="b", seq=1, ts=1.0, interval_s=60, models=models, device_stats={}, sync_stats={}
    )
    assert len(parts) > 1 and all(len(p) <= MAX_MESSAGE_BYTES for p in parts)
    docs = [json.loads(p) for p in parts]
    assert sorted(n for d in docs for n in d["models"]) == sorted(models)
    assert all(d["parts"] == len(parts) and d["v"] == 1 for d in docs)
    assert docs[0]["models"]["m0"]["nan"] is None


def test_device_stats_from_fake_proc_and_thermal(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "statm").write_text("1000 250 0 0 0 0 0\n")
    (proc / "stat").write_text("cpu 100 0 100 800 0 0 0 0 0 0\n")
    zone = tmp_path / "thermal_zone0"
    zone.mkdir()
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("48500\n")
    ds = DeviceStats(disk_path=str(tmp_path), proc=str(proc), thermal_glob=str(tmp_path / "thermal_zone*"))
    first = ds.read()
    assert (
        first["cpu_percent"] is None and first["rss_bytes"] > 0 and first["temp_c"] == {"cpu-thermal": 48.5}
    )
    (proc / "stat").write_text("cpu 150 0 150 900 0 0 0 0 0 0\n")
    assert ds.read()["cpu_percent"] == 50.0


# -- backoff and certificates -------------------------------------------------------------------


def test_backoff_is_exponential_jittered_and_capped() -> None:
    hi = Backoff(0.5, 30.0, rng=lambda: 0.0)
    lo = Backoff(0.5, 30.0, rng=lambda: 1.0)
    assert [hi.delay(n) for n in range(8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert lo.delay(3) == 2.0 and hi.delay(1000) == 30.0


def test_certificate_problem_takes_now(tmp_path: Path) -> None:
    from tests.brokers import CA

    ca = CA.create(tmp_path)
    cert, _ = ca.issue(tmp_path, "d1")
    pem = cert.read_bytes()
    import time

    assert certificate_problem(pem, "c.pem", time.time()) is None
    err = certificate_problem(pem, "c.pem", time.time() + 30 * 86400)
    assert err is not None and "expired" in err.message
    err = certificate_problem(pem, "c.pem", time.time() - 86400)
    assert err is not None and "not valid yet" in err.message


def test_online_status_accepts_daemon_model_entries() -> None:
    from edgert.device.status import online_status

    info = {
        "profile": "p",
        "providers": ["CPUExecutionProvider"],
        "models": {"a": {"version": "3", "provider": "CPUExecutionProvider"}, "b": "7"},
    }
    doc = json.loads(online_status(device="d", version="0.1", ts=1.0, uptime_s=2.0, info=info))
    assert doc["models"] == {"a": "3", "b": "7"} and doc["state"] == "online"


# -- busy replies (command queue full) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "rid"),
    [
        (None, "r-7"),  # a real signed command: its request_id is echoed for 3.1.1 correlation
        (b"\xff not json", None),
        (b"[" * 50_000, None),  # nesting too deep for json: must not raise on the network thread
        (json.dumps({"v": 1, "body": json.dumps({"request_id": "x" * 129})}).encode(), None),
        (json.dumps({"v": 1, "body": json.dumps({"request_id": 5})}).encode(), None),
        (json.dumps({"v": 1, "body": "[1]"}).encode(), None),
        (b"{" + b" " * 70_000 + b"}", None),
    ],
)
def test_busy_reply_echoes_only_a_plausible_request_id(payload: bytes | None, rid: str | None) -> None:
    key = Ed25519PrivateKey.generate()
    nonces = NonceCache()
    proc = CommandProcessor("f1", "dev-a", key.public_key(), nonces=nonces)
    if payload is None:
        payload = sign_command(key, cmd="ping", fleet="f1", device="dev-a", now=1000.0, request_id="r-7")
    reply = proc.busy_reply(payload, "queue full")
    assert reply == {
        "v": 1,
        "device": "dev-a",
        "ok": False,
        "error": {"code": "busy", "message": "queue full"},
        **({"request_id": rid} if rid else {}),
    }
    assert not nonces._seen  # neither verified nor recorded


def test_refused_commands_are_logged_once_per_reason_and_window() -> None:
    """18,380 unsigned commands used to write 18,380 warning lines (journal and collect-logs ring)."""
    import logging

    from edgert.device.commands import REFUSAL_LOG_INTERVAL_S, CommandProcessor

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("edgert.device.commands")  # our own handler: other tests reconfigure edgert.*
    logger.addHandler(handler)
    now = [0.0]
    proc = CommandProcessor("f1", "d1", None, clock=lambda: now[0])
    try:
        for _ in range(1000):
            assert proc.handle(b"not json", now=1.0)["ok"] is False
        now[0] += REFUSAL_LOG_INTERVAL_S
        proc.handle(b"not json", now=1.0)
    finally:
        logger.removeHandler(handler)
    lines = [r for r in records if r.getMessage() == "command refused"]
    assert len(lines) == 2
    assert lines[1].__dict__.get("suppressed") == 999
