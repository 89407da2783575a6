"""Cost per inference: the sampled CPU gauges move with real requests to a real daemon; so does bench."""

from __future__ import annotations

import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.config import parse_config
from edgert.metrics.timing import CPU_SAMPLE_EVERY
from tests.serve.daemon_harness import MODELS, Running, config_text, start_daemon

pytestmark = pytest.mark.integration

MODELS_TOML = f"""
[[models]]
name = "plain"
path = "{MODELS / "digits_small_int8.onnx"}"
[[models]]
name = "batched"
path = "{MODELS / "digits_small_int8.onnx"}"
max_batch_size = 4
max_queue_delay_us = 200
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp: Path = tmp_path_factory.mktemp("cost")
    running = start_daemon(parse_config(config_text(tmp, models=MODELS_TOML), "test"))
    yield running
    running.stop()


def _gauges(daemon: Running, model: str) -> dict[str, float]:
    url = f"http://{daemon.daemon.addresses['metrics']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as resp:
        text = resp.read().decode()
    pattern = re.compile(r'^edgert_(inference_cpu_\w+)\{model="' + re.escape(model) + r'"\} (\S+)$', re.M)
    return {name: float(value) for name, value in pattern.findall(text)}


@pytest.mark.parametrize("model", ["plain", "batched"])
@pytest.mark.parametrize("transport", ["http", "unix"])
def test_cpu_gauges_move_with_real_inferences(daemon, model, transport):
    x = np.load(MODELS / "digits_test.npz")["x"]
    before = _gauges(daemon, model).get("inference_cpu_samples", 0.0)
    url = daemon.http_url if transport == "http" else f"unix://{daemon.socket}"
    n = CPU_SAMPLE_EVERY * 3
    with Client(url) as client:
        for i in range(n):
            client.infer(model, {"pixels": x[i : i + 1]})
    after = _gauges(daemon, model)
    # Consecutive requests: exactly one in CPU_SAMPLE_EVERY is measured, whatever the phase.
    assert after["inference_cpu_samples"] - before == 3
    assert after["inference_cpu_infer_seconds"] > 0 and after["inference_cpu_input_seconds"] > 0
    total = after["inference_cpu_seconds"]
    parts = sum(after[f"inference_cpu_{s}_seconds"] for s in ("input", "infer", "output"))
    assert total == pytest.approx(parts)


def test_bench_reports_cpu_per_inference(edgert_cli, models_dir: Path):
    model = str(models_dir / "digits_small_int8.onnx")
    r = edgert_cli("bench", model, "--iterations", "200", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["iterations"] == 200
    assert doc["cpu_ms_per_inference"] >= doc["thread_cpu_ms_per_inference"] > 0
    text = edgert_cli("bench", str(models_dir / "digits_small_int8.onnx"), "--iterations", "50")
    assert text.returncode == 0 and "ms per inference" in text.stdout
