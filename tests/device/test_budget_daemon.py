"""Models under a memory budget, over a real daemon, real HTTP and socket, real models from the store.

Twenty copies of the digits model are installed in the encrypted store; the budget holds about five
(each measures about 1.5 MB at load). One copy is pinned and loads at start; the others are lazy.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.client import Client
from tests.device.budget_kit import (
    COLD_HEADER,
    DIGITS,
    MOBILENET,
    digits_inputs,
    http_get,
    http_infer,
    http_logits,
    install,
    metric_values,
    socket_infer,
    write_config,
)
from tests.device.subproc import cli, free_port, start_daemon, stop_daemon

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMES = [f"m{i:02d}" for i in range(20)]
PINNED = "m00"
BUDGET_MB = 8.0
MIX_THREADS = 4
MIX_REQUESTS = 60  # per thread


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("budget") / "state"
    install(state, {**{n: DIGITS for n in NAMES}, "big": MOBILENET})
    return state


@pytest.fixture()
def daemon(tmp_path: Path, store_dir: Path) -> Iterator[dict[str, Any]]:
    models: list[dict[str, Any]] = [{"name": PINNED, "pin": True}]
    models += [{"name": n, "load": "lazy"} for n in NAMES[1:]]
    models += [{"name": "big", "load": "lazy"}]
    http_port, metrics_port = free_port(), free_port()
    config = write_config(tmp_path, store_dir, BUDGET_MB, models, http_port, metrics_port)
    proc = start_daemon(config)
    try:
        yield {"http": http_port, "metrics": metrics_port, "sock": tmp_path / "edgert.sock", "proc": proc,
               "config": config}
    finally:
        code, err = stop_daemon(proc)
        assert code == 0, err[-2000:]


@pytest.fixture(scope="module")
def expected() -> np.ndarray:
    from edgert.runtime import Runtime

    model = Runtime(profile="cpu-generic").load(DIGITS)
    try:
        return model.run({"pixels": digits_inputs(8)})["logits"]
    finally:
        model.close()


def _status(d: dict[str, Any]) -> dict[str, Any]:
    with Client(f"unix://{d['sock']}") as c:
        return c.status()


def test_lazy_is_told_from_loaded_and_the_cold_header_comes_only_with_a_load(daemon: dict[str, Any],
                                                                             expected: np.ndarray) -> None:
    st = _status(daemon)
    assert st["models"][PINNED]["state"] == "loaded" and st["models"]["m01"]["state"] == "lazy"
    assert st["memory"]["loaded"] == [PINNED] and st["memory"]["budget_bytes"] == int(BUDGET_MB * 2**20)
    # a lazy model that is not loaded is ready (its next request loads it) and described by its manifest
    assert http_get(daemon["http"], "/v2/models/m01/ready") == (200, {"name": "m01", "ready": True})
    code, meta = http_get(daemon["http"], "/v2/models/m01")
    assert code == 200 and meta["inputs"][0]["name"] == "pixels" and meta["versions"] == ["1"]
    with Client(f"unix://{daemon['sock']}") as c:
        assert set(c.models()) >= set(NAMES)  # lazy ones are listed too
    listed = cli("models", "list", "--config", str(daemon["config"]))
    assert listed.returncode == 0, listed.stderr
    assert "lazy (daemon: loads on its next request)" in listed.stdout
    x = digits_inputs(8)
    seen_cold = seen_warm = 0
    # sequentially, so the daemon's view before each request says whether it is cold
    for i, name in enumerate(["m01", "m02", "m01", "m03", "m04", "m05", "m06", "m07", "m08", "m01", "m08"]):
        loaded = set(_status(daemon)["memory"]["loaded"])
        if i % 2 == 0:
            code, headers, doc = http_infer(daemon["http"], name, x)
            assert code == 200, doc
            np.testing.assert_allclose(http_logits(doc), expected, rtol=1e-4, atol=1e-4)
            cold = COLD_HEADER in headers
            if cold:
                assert float(headers[COLD_HEADER]) > 0
        else:
            meta, outputs = socket_infer(daemon["sock"], name, x)
            assert "error" not in meta, meta
            np.testing.assert_allclose(outputs["logits"], expected, rtol=1e-4, atol=1e-4)
            cold = "cold_load_ms" in meta
        assert cold == (name not in loaded), (name, loaded)
        seen_cold += cold
        seen_warm += not cold
    assert seen_cold >= 8 and seen_warm >= 2  # m01 came back cold after being unloaded for room
    evictions = metric_values(daemon["metrics"], "evictions_total")
    assert evictions.get("m01", 0) >= 1 and evictions.get(PINNED, 0) == 0


def test_twenty_models_under_a_budget_answer_a_mix_with_no_failures(daemon: dict[str, Any],
                                                                   expected: np.ndarray) -> None:
    x = digits_inputs(8)
    failures: list[str] = []
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def monitor() -> None:
        while not done.is_set():
            samples.append(_status(daemon)["memory"])
            done.wait(0.02)

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        weights = [1 / (i + 1) for i in range(len(NAMES))]  # Zipf-like: a few hot models, a long tail
        for _ in range(MIX_REQUESTS):
            name = rng.choices(NAMES, weights)[0]
            try:
                if seed % 2:
                    meta, outputs = socket_infer(daemon["sock"], name, x)
                    if "error" in meta:
                        failures.append(f"{name}: {meta['error']}")
                        continue
                    logits = outputs["logits"]
                else:
                    code, _, doc = http_infer(daemon["http"], name, x)
                    if code != 200:
                        failures.append(f"{name}: {code} {doc}")
                        continue
                    logits = http_logits(doc)
                if not np.allclose(logits, expected, rtol=1e-4, atol=1e-4):
                    failures.append(f"{name}: wrong logits")
            except Exception as exc:  # any transport failure is a failed request
                failures.append(f"{name}: {type(exc).__name__}: {exc}")

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(MIX_THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    done.set()
    watcher.join()
    assert failures == []
    samples.append(_status(daemon)["memory"])
    budget = int(BUDGET_MB * 2**20)
    assert all(s["used_bytes"] <= budget for s in samples), max(s["used_bytes"] for s in samples)
    assert all(PINNED in s["loaded"] for s in samples)
    most = max(len(s["loaded"]) for s in samples)
    assert 2 <= most < len(NAMES)  # several models share the budget; never all twenty
    assert samples[-1]["evictions"] > 0 and samples[-1]["cold_loads"] >= 10
    assert metric_values(daemon["metrics"], "evictions_total").get(PINNED, 0) == 0
    footprints = metric_values(daemon["metrics"], "model_footprint_bytes")
    assert footprints[PINNED] > 0 and sum(footprints.values()) <= budget


def test_concurrent_first_requests_wait_for_one_load(daemon: dict[str, Any], expected: np.ndarray) -> None:
    x = digits_inputs(8)
    name, callers = "m19", 12
    barrier = threading.Barrier(callers)
    results: list[tuple[bool, bool]] = []  # (answered right, reported a cold load)

    def call(i: int) -> None:
        barrier.wait()
        if i % 2:
            meta, outputs = socket_infer(daemon["sock"], name, x)
            ok = "error" not in meta and np.allclose(outputs["logits"], expected, rtol=1e-4, atol=1e-4)
            results.append((bool(ok), "cold_load_ms" in meta))
        else:
            code, headers, doc = http_infer(daemon["http"], name, x)
            ok = code == 200 and np.allclose(http_logits(doc), expected, rtol=1e-4, atol=1e-4)
            results.append((bool(ok), COLD_HEADER in headers))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == callers and all(ok for ok, _ in results)
    assert any(cold for _, cold in results)
    assert metric_values(daemon["metrics"], "cold_loads_total")[name] == 1


def test_a_model_bigger_than_the_budget_is_refused_and_the_rest_serve(daemon: dict[str, Any]) -> None:
    image = np.zeros((1, 224, 224, 3), dtype=np.float32)
    meta, _ = socket_infer(daemon["sock"], "big", image)
    assert "more than the whole memory budget (8.0 MB)" in meta["error"], meta
    first = meta
    assert "memory_budget_mb" in meta["error"]  # the hint says what to change
    st = _status(daemon)
    assert st["models"]["big"]["state"] == "failed" and "memory budget" in st["models"]["big"]["error"]
    code, doc = http_get(daemon["http"], "/v2/models/big/ready")
    assert code == 503 and doc["ready"] is False
    # refused without loading it again, with the same status as the first time; the others still serve
    meta, _ = socket_infer(daemon["sock"], "big", image)
    assert "memory budget" in meta["error"]
    assert first["status"] == meta["status"] == 404, (first, meta)
    assert metric_values(daemon["metrics"], "cold_loads_total").get("big", 0) == 0
    code, _, _ = http_infer(daemon["http"], "m03", digits_inputs(1))
    assert code == 200


def test_a_budget_too_small_for_the_pinned_models_is_refused_at_check_and_start(tmp_path: Path,
                                                                                 store_dir: Path) -> None:
    models = [{"name": "big", "pin": True}, {"name": "m01", "load": "lazy"}]
    config = write_config(tmp_path, store_dir, 2, models, free_port())
    r = cli("daemon", "--check", "--config", str(config))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "memory_budget_mb = 2 is too small for the pinned models" in out and "big" in out
    assert "needs at least 3.7 MB (its decrypted size)" in out
    with pytest.raises(AssertionError) as info:
        proc = start_daemon(config)
        stop_daemon(proc)
    assert "too small for the pinned models" in str(info.value)


def test_a_fitting_budget_passes_the_check(tmp_path: Path, store_dir: Path) -> None:
    models = [{"name": "m01", "pin": True}, {"name": "big", "load": "lazy"}]
    config = write_config(tmp_path, store_dir, 64, models, free_port())
    r = cli("daemon", "--check", "--config", str(config))
    assert "largest model at least 3.7 MB" in r.stdout + r.stderr, r.stdout + r.stderr
