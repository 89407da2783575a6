"""Benchmark MQTT sync: inference with telemetry on vs off, spool rates, drain after an outage, bytes/hour.

Runs a real mosquitto on a free loopback port and a real edgert Runtime on models/digits_small_int8.onnx.
Ratios are measured side by side in one run (interleaved rounds). Usage:

    python tools/bench_mqtt.py [--seconds 3] [--rounds 3] [--records 10000] [--outage 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgert import Runtime  # noqa: E402
from edgert.device.sync import SyncService  # noqa: E402
from edgert.device.sync_config import MqttSettings  # noqa: E402
from edgert.metrics import Metrics  # noqa: E402
from edgert.mqtt.config import DEFAULT_TELEMETRY_INTERVAL_S  # noqa: E402
from edgert.mqtt.nonces import PersistentNonceCache  # noqa: E402
from edgert.mqtt.signing import NonceCache  # noqa: E402
from edgert.mqtt.spool import Spool  # noqa: E402
from tests.brokers import Mosquitto  # noqa: E402

MODEL = ROOT / "models" / "digits_small_int8.onnx"


def config(tmp: Path, port: int, name: str, **kw: object) -> MqttSettings:
    d: dict[str, object] = {
        "host": "127.0.0.1",
        "port": port,
        "fleet": "bench",
        "device_id": "dev-1",
        "spool_path": str(tmp / f"{name}.sqlite"),
        "reconnect_min": 0.2,
        "reconnect_max": 0.5,
    }
    d.update(kw)
    return MqttSettings.from_dict(d, "bench")


def infer_rate(model, metrics: Metrics, seconds: float) -> float:  # type: ignore[no-untyped-def]
    x = {"pixels": np.random.default_rng(0).uniform(0, 16, (1, 64)).astype(np.float32)}
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        model.infer(x)
        metrics.observe_request("digits", time.perf_counter() - t0)
        n += 1
    return n / seconds


def bench_overhead(tmp: Path, port: int, seconds: float, rounds: int, interval: float) -> dict[str, float]:
    """Rounds alternate which side goes first, so drift and warm-up hit both sides equally."""
    model = Runtime(profile="cpu-generic").load(MODEL, name="digits")
    metrics = Metrics()
    infer_rate(model, metrics, 1.0)  # warm-up
    off: list[float] = []
    on: list[float] = []
    published = 0
    for r in range(rounds):
        svc = SyncService(
            config(tmp, port, f"ovh{r}", telemetry_interval=interval),
            stats_provider=lambda: metrics.snapshot(reset_window=True),
        )
        if r % 2 == 0:
            off.append(infer_rate(model, metrics, seconds))
        svc.start()
        svc.link.wait_connected(10)
        on.append(infer_rate(model, metrics, seconds))
        published += svc.counters["published"]
        svc.stop()
        if r % 2 == 1:
            off.append(infer_rate(model, metrics, seconds))
    model.close()
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    return {
        "infer_per_s_off": float(np.median(off)),
        "infer_per_s_on": float(np.median(on)),
        "ratio_on_off_median": float(np.median(ratios)),
        "ratio_on_off_min": float(min(ratios)),
        "rounds": rounds,
        "telemetry_interval_s": interval,
        "telemetry_published": published,
    }


def bench_spool(tmp: Path, records: int, payload: bytes) -> dict[str, float]:
    sp = Spool(tmp / "rate.sqlite", records * 2)
    t0 = time.perf_counter()
    ids = [
        sp.enqueue("edgert/v1/bench/devices/dev-1/telemetry", payload, time.time()) for _ in range(records)
    ]
    write = records / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(0, records, 100):
        sp.peek(ids[i] - 1, 100)
        sp.ack_many([x for x in ids[i : i + 100] if x is not None])
    read_ack = records / (time.perf_counter() - t0)
    sp.close()
    return {"spool_write_per_s": write, "spool_peek_ack_per_s": read_ack}


def bench_drain(tmp: Path, records: int, payload: bytes, outage: float) -> dict[str, float]:
    broker = Mosquitto(tmp / "drain")
    svc = SyncService(config(tmp, broker.port, "drain", telemetry_interval=3600))
    svc.start()
    for _ in range(records):
        svc.spool.enqueue(svc.telemetry_topic, payload, time.time())
    threading.Event().wait(outage)
    broker.start()
    t0 = time.perf_counter()
    svc.link.wait_connected(30)
    t_conn = time.perf_counter()
    while svc.spool.pending and time.perf_counter() - t0 < 300:
        time.sleep(0.01)
    t_end = time.perf_counter()
    lost = svc.spool.pending
    svc.stop()
    broker.stop()
    return {
        "drain_records": records,
        "outage_s": outage,
        "reconnect_s": t_conn - t0,
        "drain_s": t_end - t_conn,
        "drain_per_s": records / (t_end - t_conn),
        "left_in_spool": lost,
    }


def telemetry_sample(tmp: Path) -> bytes:
    """One real telemetry message with stats from real inference on three model names."""
    model = Runtime(profile="cpu-generic").load(MODEL, name="digits")
    metrics = Metrics()
    for name in ("digits", "digits-large", "mobilenet"):
        infer_rate_named(model, metrics, name, 0.2)
    model.close()
    cfg = config(tmp, 1, "sample")
    svc = SyncService(cfg, stats_provider=lambda: metrics.snapshot(reset_window=True))
    svc.publish_telemetry()
    rec = svc.spool.peek(0, 1)[0]
    svc.spool.close()
    return rec.payload


def infer_rate_named(model, metrics: Metrics, name: str, seconds: float) -> None:  # type: ignore[no-untyped-def]
    x = {"pixels": np.zeros((1, 64), np.float32)}
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        model.infer(x)
        metrics.observe_request(name, time.perf_counter() - t0)


def bytes_per_hour(payload: bytes) -> dict[str, float]:
    topic = b"edgert/v1/bench/devices/dev-1/telemetry"
    # MQTT 5 PUBLISH: fixed header (1 + up to 3 length bytes) + topic length + topic + packet id
    # + properties (content type) + payload; PUBACK back: 4 bytes. TCP/IP and TLS framing not counted.
    publish = 4 + 2 + len(topic) + 2 + 1 + 19 + len(payload)
    per_msg = publish + 4
    per_hour = per_msg * 3600 / DEFAULT_TELEMETRY_INTERVAL_S
    return {
        "telemetry_payload_bytes": len(payload),
        "mqtt_bytes_per_message": per_msg,
        "bytes_per_hour_default_interval": per_hour,
        "mb_per_day": per_hour * 24 / 1e6,
    }


def bench_nonces(tmp: Path, commands: int) -> dict[str, float]:
    """Per-command cost of the persistent nonce store (fsync'd SQLite) against the in-memory cache."""
    now = time.time()
    persistent = PersistentNonceCache(tmp / "nonces.sqlite", now=now)
    memory = NonceCache()
    out: dict[str, float] = {"commands": commands}
    try:
        for name, store in (("memory", memory), ("sqlite", persistent), ("memory2", memory)):
            t0 = time.perf_counter()
            for i in range(commands):
                store.check_and_add(f"{name}-{i:016x}", now + 60, now, iat=now)
            out[f"{name}_us_per_command"] = (time.perf_counter() - t0) / commands * 1e6
    finally:
        persistent.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument(
        "--outage", type=float, default=5.0, help="broker outage before draining (60 for the target)"
    )
    ap.add_argument("--interval", type=float, default=1.0, help="telemetry interval during the overhead test")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        payload = telemetry_sample(tmp)
        broker = Mosquitto(tmp / "main").start()
        try:
            results = {"overhead": bench_overhead(tmp, broker.port, args.seconds, args.rounds, args.interval)}
        finally:
            broker.stop()
        results["spool"] = bench_spool(tmp, args.records, payload)
        results["drain"] = bench_drain(tmp, args.records, payload, args.outage)
        results["bandwidth"] = bytes_per_hour(payload)
        results["nonces"] = bench_nonces(tmp, 500)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
