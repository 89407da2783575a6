"""Metrics registry: Prometheus text parsed by prometheus_client, telemetry snapshots, process stats."""

from __future__ import annotations

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgert.metrics import Metrics
from edgert.metrics.process import cpu_seconds, open_fds, resident_memory_bytes


def families(m: Metrics) -> dict:
    text = m.render_prometheus().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(fams: dict, family: str, name: str, **labels: str) -> float:
    for s in fams[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {name}{labels}")


def test_prometheus_text_parses_and_counts() -> None:
    m = Metrics()
    m.set_model_info(
        'we"ird\\model\n', version="2", provider="CPUExecutionProvider", fmt="onnx", load_seconds=0.05
    )
    m.set_model_info("digits", version="1", provider="litert:cpu", fmt="tflite", load_seconds=0.01)
    for s in (1e-4, 2e-4, 3e-3):
        m.observe_request("digits", s)
    m.observe_request("digits", 0.0, error="overloaded")
    m.observe_request("digits", 1e-5, error="input")
    m.observe_batch("digits", 1)
    m.observe_batch("digits", 17)
    m.observe_cache("digits", True)
    m.observe_cache("digits", False)
    m.observe_cascade("casc", 10, 3)
    m.set_model_info("casc", version="1+1", provider="cascade", kind="cascade")
    m.add_gauge_source("queue_depth", "Requests waiting.", lambda: {"digits": 7})
    f = families(m)
    assert sample(f, "edgert_requests", "edgert_requests_total", model="digits") == 5
    assert sample(f, "edgert_request_errors", "edgert_request_errors_total", reason="overloaded") == 1
    assert (
        sample(f, "edgert_request_latency_seconds", "edgert_request_latency_seconds_count", model="digits")
        == 3
    )
    assert (
        sample(
            f,
            "edgert_request_latency_seconds",
            "edgert_request_latency_seconds_bucket",
            model="digits",
            le="0.00025",
        )
        == 2
    )
    p99 = sample(
        f,
        "edgert_request_latency_quantile_seconds",
        "edgert_request_latency_quantile_seconds",
        model="digits",
        quantile="0.99",
    )
    assert abs(p99 - 2e-4) <= 0.01 * 2e-4  # rank floor(0.99 * 2) = 1 -> second smallest
    assert sample(f, "edgert_batch_size", "edgert_batch_size_bucket", model="digits", le="16") == 1
    assert sample(f, "edgert_batch_size", "edgert_batch_size_bucket", model="digits", le="32") == 2
    assert sample(f, "edgert_cache_hits", "edgert_cache_hits_total", model="digits") == 1
    assert sample(f, "edgert_cascade_escalations", "edgert_cascade_escalations_total", model="casc") == 3
    assert (
        sample(
            f,
            "edgert_model_info",
            "edgert_model_info",
            model='we"ird\\model\n',
            provider="CPUExecutionProvider",
        )
        == 1
    )
    assert sample(
        f, "edgert_model_load_seconds", "edgert_model_load_seconds", model="digits"
    ) == pytest.approx(0.01)
    assert sample(f, "edgert_queue_depth", "edgert_queue_depth", model="digits") == 7
    assert sample(f, "process_resident_memory_bytes", "process_resident_memory_bytes") > 1_000_000


def test_snapshot_windows() -> None:
    now = [100.0]
    m = Metrics(clock=lambda: now[0])
    m.set_model_info("d", version="1", provider="cpu")
    for _ in range(10):
        m.observe_request("d", 1e-3)
    m.observe_request("d", 0, error="input")
    m.observe_cache("d", True)
    first = m.snapshot(reset_window=True)["models"]["d"]
    assert first["requests"] == 11 and first["errors"] == {"input": 1}
    assert first["cache"]["hit_rate"] == 1.0
    assert abs(first["latency_s"]["p50"] - 1e-3) <= 1e-5
    now[0] = 160.0
    for _ in range(4):
        m.observe_request("d", 5e-3)
    m.observe_cache("d", False)
    snap = m.snapshot(reset_window=True)
    second = snap["models"]["d"]
    assert snap["window_seconds"] == 60.0
    assert second["requests"] == 4 and second["errors"] == {}
    assert second["cache"] == {"hits": 0, "misses": 1, "hit_rate": 0.0}
    assert abs(second["latency_s"]["p99"] - 5e-3) <= 5e-5
    assert m.snapshot()["models"]["d"]["requests"] == 15  # cumulative view is untouched


def test_concurrent_observations_are_not_lost() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(2000):
            m.observe_request("d", 1e-4)
            m.observe_batch("d", 2)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = m.stats_copy("d")
    assert stats["requests"] == 8000
    assert stats["latency_sketch"]["n"] == 8000


def test_process_stats(tmp_path) -> None:
    assert resident_memory_bytes() > 1_000_000
    assert cpu_seconds() > 0
    assert open_fds() >= 3
    assert resident_memory_bytes(str(tmp_path / "missing")) is None
    bad = tmp_path / "statm"
    bad.write_text("garbage")
    assert resident_memory_bytes(str(bad)) is None
