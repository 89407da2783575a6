"""Triton's statistics extension, read by the unmodified `tritonclient.http` client from a real daemon."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.config import parse_config
from tests.serve.daemon_harness import MODELS, Running, config_text, start_daemon

pytestmark = pytest.mark.integration

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

SMALL = MODELS / "digits_small_int8.onnx"
MODELS_TOML = f"""
[[models]]
name = "plain"
path = "{SMALL}"
[[models]]
name = "batched"
path = "{SMALL}"
max_batch_size = 8
max_queue_delay_us = 2000
[[models]]
name = "cached"
path = "{SMALL}"
cache_bytes = 1048576
[[models]]
name = "large"
path = "{MODELS / "digits_large_int8.onnx"}"
[[cascades]]
name = "cascade"
small = "plain"
large = "large"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp: Path = tmp_path_factory.mktemp("stats")
    running = start_daemon(parse_config(config_text(tmp, models=MODELS_TOML), "test"))
    yield running
    running.stop()


@pytest.fixture
def triton(daemon: Running) -> Iterator[object]:
    client = httpclient.InferenceServerClient(url=daemon.daemon.addresses["http"], concurrency=4)
    yield client
    client.close()


def _infer(client: object, model: str, x: np.ndarray, binary: bool = True) -> np.ndarray:
    inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    return client.infer(model, [inp]).as_numpy("logits")  # type: ignore[attr-defined]


def _stat(client: object, model: str, version: str = "") -> dict:
    doc = client.get_inference_statistics(model, version)  # type: ignore[attr-defined]
    assert len(doc["model_stats"]) == 1
    return doc["model_stats"][0]


def test_counts_match_what_was_sent(triton, digits):
    x, _ = digits
    before = _stat(triton, "plain")
    assert before["inference_count"] == 0 and before["inference_stats"]["success"]["count"] == 0
    for i in range(5):
        _infer(triton, "plain", x[i : i + 1], binary=bool(i % 2))
    _infer(triton, "plain", x[:8])
    st = _stat(triton, "plain", "1")
    assert (st["name"], st["version"]) == ("plain", "1")
    inf = st["inference_stats"]
    assert inf["success"]["count"] == 6 and inf["fail"]["count"] == 0
    assert st["inference_count"] == 13  # rows: 5 x 1 + 8
    assert st["execution_count"] == 6  # unbatched: one run per request
    for stage in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert inf[stage]["count"] == 6, stage
    for stage in ("success", "compute_input", "compute_infer"):
        assert inf[stage]["ns"] > 0, stage
    assert inf["cache_hit"] == {"count": 0, "ns": 0}
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in st["batch_stats"]} == {1: 5, 8: 1}
    assert st["last_inference"] > 1_700_000_000_000  # ms since the epoch


def test_failures_are_counted_and_the_daemon_keeps_serving(triton, digits):
    x, _ = digits
    before = _stat(triton, "plain")["inference_stats"]
    wrong = httpclient.InferInput("pixels", [1, 32], "FP32")
    wrong.set_data_from_numpy(x[:1, :32])
    for _ in range(3):
        with pytest.raises(InferenceServerException, match="pixels"):
            triton.infer("plain", [wrong])
    bad = np.full((1, 64), np.nan, dtype=np.float32)  # NaN passes the default nan_policy "allow"
    _infer(triton, "plain", bad)
    after = _stat(triton, "plain")["inference_stats"]
    assert after["fail"]["count"] == before["fail"]["count"] + 3
    assert after["success"]["count"] == before["success"]["count"] + 1


def test_batched_model_counts_rows_and_runs(triton, digits):
    x, _ = digits
    pending = []
    for i in range(40):  # tritonclient's own concurrency (gevent), 4 connections: batches form
        inp = httpclient.InferInput("pixels", [1, 64], "FP32")
        inp.set_data_from_numpy(x[i : i + 1], binary_data=True)
        pending.append(triton.async_infer("batched", [inp]))
    for i, req in enumerate(pending):
        assert req.get_result().as_numpy("logits").shape == (1, 10), i
    st = _stat(triton, "batched")
    assert st["inference_stats"]["success"]["count"] == 40
    assert st["inference_count"] == 40
    runs = {b["batch_size"]: b["compute_infer"]["count"] for b in st["batch_stats"]}
    assert sum(size * n for size, n in runs.items()) == 40  # every row ran in exactly one batch
    assert st["execution_count"] == sum(runs.values()) <= 40
    assert all(1 <= size <= 8 for size in runs)


def test_cache_hits_are_reported_apart(triton, digits):
    x, _ = digits
    for _ in range(4):
        _infer(triton, "cached", x[:2])
    st = _stat(triton, "cached")
    inf = st["inference_stats"]
    assert inf["success"]["count"] == 4 and inf["cache_hit"]["count"] == 3
    assert st["inference_count"] == 2 and st["execution_count"] == 1  # cache hits are not inferences
    assert inf["compute_infer"]["count"] == 1


def test_all_models_and_cascade_members(triton, digits):
    x, _ = digits
    _infer(triton, "cascade", x[:4])
    doc = triton.get_inference_statistics()
    names = {(s["name"], s["version"]) for s in doc["model_stats"]}
    assert names == {("plain", "1"), ("batched", "1"), ("cached", "1"), ("large", "1")}
    large = next(s for s in doc["model_stats"] if s["name"] == "large")
    assert large["inference_stats"]["success"]["count"] + large["inference_stats"]["fail"]["count"] <= 1


def test_unknown_version_and_model_are_clear_404s(triton):
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("plain", "7")
    assert info.value.status() == "404"
    assert "version '7'" in info.value.message() and "['1']" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("nope")
    assert info.value.status() == "404" and "'nope'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        triton.get_inference_statistics("cascade")
    assert info.value.status() == "404" and "member model" in info.value.message()


def test_server_metadata_announces_statistics(triton):
    assert "statistics" in triton.get_server_metadata()["extensions"]
