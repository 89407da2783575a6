"""``[models.drift]`` parsing, and a DriftWatch that never fails a request over a bad or missing profile."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert.config import ModelEntry, parse_config
from edgert.device.drift import DriftWatch
from edgert.drift import DriftSettings, build_profile
from edgert.errors import ConfigError

BASE = """
[daemon]
state_dir = "/tmp/x"
[[models]]
name = "digits"
"""


def test_defaults_and_a_full_table() -> None:
    assert parse_config(BASE).models[0].drift == DriftSettings()
    cfg = parse_config(BASE + """[models.drift]
window = 0
window_s = 600
min_samples = 50
psi_threshold = 0.2
js_threshold = 0.05
confidence_drop = 0.1
event_interval_s = 60
capture_samples = 16
capture_fleet_key = "x25519:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
sample_every = 1
""")
    d = cfg.models[0].drift
    assert (d.window, d.window_s, d.min_samples, d.capture_samples, d.sample_every) == (0, 600.0, 50, 16, 1)
    assert (d.psi_threshold, d.js_threshold, d.confidence_drop, d.event_interval_s) == (0.2, 0.05, 0.1, 60.0)


@pytest.mark.parametrize(("table", "names"), [
    ("window = 0", ["models[0].drift.window", "exactly one of window"]),
    ("window_s = 30", ["models[0].drift.window", "exactly one of window"]),
    ("js_threshold = 2.0", ["models[0].drift.js_threshold"]),
    ("psi_threshold = -1", ["models[0].drift.psi_threshold"]),
    ('capture_fleet_key = "ed25519:nope"', ["models[0].drift.capture_fleet_key", "x25519"]),
    ("windw = 10", ["windw"]),
    ("enabled = 1", ["models[0].drift.enabled"]),
    ("sample_every = 0", ["models[0].drift.sample_every"]),
])
def test_bad_drift_settings_name_the_key(table: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(BASE + "[models.drift]\n" + table + "\n", "edgert.toml")
    text = str(exc.value)
    assert "edgert.toml" in text
    for name in names:
        assert name in text


def _profile() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    return build_profile({"x": rng.normal(size=(100, 4))}, {"y": rng.normal(size=(100, 3))}).to_dict()


def _watch(reference: Any, entry: ModelEntry | None, audit: list[Any]) -> DriftWatch:
    return DriftWatch(entry=lambda name: entry, reference=reference,
                      audit=lambda *a, **k: audit.append((a, k)), capture_root=lambda: Path("/nonexistent"))


def test_watch_scores_a_model_with_a_profile_and_skips_the_rest() -> None:
    entry = ModelEntry(name="m", drift=DriftSettings(window=64, min_samples=32, sample_every=1))
    calls: list[str] = []

    def reference(e: ModelEntry, version: str) -> dict[str, Any] | None:
        calls.append(version)
        return _profile() if version == "2" else None

    watch = _watch(reference, entry, [])
    x, y = np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)
    for _ in range(10):
        watch.observe("m", "1", {"x": x}, {"y": y})
    assert calls == ["1"] and watch.status("m") is None  # looked up once per version, then one dict get
    for _ in range(40):
        watch.observe("m", "2", {"x": x}, {"y": y})
    assert calls == ["1", "2"]
    status = watch.status("m")
    assert status is not None and status["samples"] >= 32
    assert watch.gauge("samples")() == {"m": float(status["samples"])}


def test_watch_never_fails_a_request_over_a_bad_profile() -> None:
    audit: list[Any] = []
    entry = ModelEntry(name="m")
    bad = _watch(lambda e, v: {"v": 1, "samples": 3, "inputs": {"x": {"kind": "values"}}, "outputs": {}},
                 entry, audit)
    bad.observe("m", "1", {"x": np.zeros((1, 4))}, {"y": np.zeros((1, 3))})
    assert bad.status("m") is None and audit == []
    off = _watch(lambda e, v: _profile(), ModelEntry(name="m", drift=DriftSettings(enabled=False)), audit)
    off.observe("m", "1", {"x": np.zeros((1, 4))}, {"y": np.zeros((1, 3))})
    assert off.status("m") is None
    # a request whose tensors do not fit the profile (another shape) turns drift off, not the request
    odd = _watch(lambda e, v: _profile(),
                 ModelEntry(name="m", drift=DriftSettings(window=8, min_samples=1, sample_every=1)), audit)
    for _ in range(10):
        odd.observe("m", "1", {"x": np.zeros((1, 5))}, {"y": np.zeros((1, 3))})
    assert odd.status("m") is None


def test_reset_starts_fresh_windows_with_the_current_settings() -> None:
    entries = {"m": ModelEntry(name="m", drift=DriftSettings(window=64, min_samples=8, sample_every=1))}
    watch = DriftWatch(entry=lambda name: entries.get(name), reference=lambda e, v: _profile(),
                       audit=lambda *a, **k: None, capture_root=lambda: Path("/nonexistent"))
    x, y = np.zeros((1, 4), np.float32), np.zeros((1, 3), np.float32)
    for _ in range(20):
        watch.observe("m", "1", {"x": x}, {"y": y})
    assert watch.monitors["m"].settings.window == 64
    entries["m"] = ModelEntry(name="m", drift=DriftSettings(window=500, min_samples=8, sample_every=1))  # HUP
    watch.reset()
    watch.observe("m", "1", {"x": x}, {"y": y})
    assert watch.monitors["m"].settings.window == 500
