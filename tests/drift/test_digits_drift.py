"""Live drift on the real digits model: shifted inputs trip the alarm; the held-out split never does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgert.drift import DriftMonitor, DriftSettings, ReferenceProfile, build_profile
from edgert.errors import ConfigError

MODELS = Path(__file__).resolve().parents[2] / "models"
SETTINGS = DriftSettings(window=500, min_samples=200, sample_every=1)


def training_split() -> np.ndarray:
    """sklearn's bundled digits, split exactly as tools/modelkit/common.py does (no download)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    xtr, _, _, _ = train_test_split(ds.data.astype(np.float32), ds.target, test_size=0.2, random_state=0,
                                    stratify=ds.target)
    return np.asarray(xtr, np.float32)


@pytest.fixture(scope="module")
def run() -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS / "digits_small_int8.onnx"), providers=["CPUExecutionProvider"])
    return lambda x: {"logits": session.run(None, {"pixels": x})[0]}


@pytest.fixture(scope="module")
def profile(run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> ReferenceProfile:
    xtr = training_split()
    return ReferenceProfile.from_dict(build_profile({"pixels": xtr}, run(xtr)).to_dict())  # as shipped


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    return np.asarray(np.load(MODELS / "digits_test.npz")["x"], np.float32)


def stream(monitor: DriftMonitor, x: np.ndarray, run: Callable[[np.ndarray], dict[str, np.ndarray]],
           seed: int) -> list[object]:
    """Send ``x`` in a seeded order as requests of 1-4 rows; return the alarms raised."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    alarms, i = [], 0
    while i < len(order):
        batch = x[order[i:i + int(rng.integers(1, 5))]]
        i += len(batch)
        alarm = monitor.observe({"pixels": batch}, run(batch))
        if alarm is not None:
            alarms.append(alarm)
    last = monitor.flush()
    return [*alarms, last] if last is not None else alarms


def test_held_out_split_never_trips_across_20_seeded_runs(profile: ReferenceProfile, held_out: np.ndarray,
                                                          run: Callable[[np.ndarray], dict[str, np.ndarray]]
                                                          ) -> None:
    worst = 0.0
    for seed in range(20):
        monitor = DriftMonitor("digits", "1", profile, SETTINGS)
        assert stream(monitor, held_out, run, seed) == []
        head = monitor.headline()
        assert head["samples"] >= SETTINGS.min_samples  # the window was judged
        worst = max(worst, head["psi"])
    assert worst < SETTINGS.psi_threshold / 2


def shifts(x: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "noise": np.clip(x + rng.normal(0.0, 3.0, x.shape), 0, 16).astype(np.float32),
        "inversion": (16.0 - x).astype(np.float32),
        "scaling_down": (x * 0.6).astype(np.float32),
        "scaling_up": (x * 1.5).astype(np.float32),
    }


@pytest.mark.parametrize("shift", ["noise", "inversion", "scaling_down", "scaling_up"])
def test_shifted_inputs_trip_the_alarm(shift: str, profile: ReferenceProfile, held_out: np.ndarray,
                                       run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
    monitor = DriftMonitor("digits", "1", profile, SETTINGS)
    alarms = stream(monitor, shifts(held_out)[shift], run, 0)
    assert len(alarms) == 1  # once, not per request: it re-arms only when the scores come back
    alarm = alarms[0]
    assert any("input pixels: psi" in c for c in alarm.crossed)  # type: ignore[attr-defined]
    assert monitor.headline()["alarm"] == 1.0


def test_inversion_moves_the_class_mix_and_scaling_down_the_confidence(
        profile: ReferenceProfile, held_out: np.ndarray,
        run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
    inv = DriftMonitor("digits", "1", profile, SETTINGS)
    stream(inv, shifts(held_out)["inversion"], run, 0)
    assert inv.scores()["outputs"]["logits"]["js"] > SETTINGS.js_threshold
    ok = DriftMonitor("digits", "1", profile, SETTINGS)
    stream(ok, held_out, run, 0)
    low = DriftMonitor("digits", "1", profile, SETTINGS)
    stream(low, (held_out * 0.4).astype(np.float32), run, 0)
    assert low.headline()["confidence"] < ok.headline()["confidence"] - 0.1


def test_alarm_rearms_after_recovery_and_respects_the_interval(
        profile: ReferenceProfile, held_out: np.ndarray,
        run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
    now = [0.0]
    settings = DriftSettings(window=200, min_samples=100, event_interval_s=60.0, sample_every=1)
    monitor = DriftMonitor("digits", "1", profile, settings, clock=lambda: now[0])
    bad = shifts(held_out)["inversion"]
    assert len(stream(monitor, bad, run, 0)) == 1
    for seed in range(3):  # the window fills with good data again: the alarm re-arms
        stream(monitor, held_out, run, seed)
    assert monitor.headline()["alarm"] == 0.0
    assert stream(monitor, bad, run, 1) == []  # re-armed, but within the event interval
    now[0] += 61.0  # the drift persists past the interval: it is reported then
    assert len(stream(monitor, bad, run, 2)) == 1
    assert monitor.alarms == 2


def test_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="exactly one of window"):
        DriftSettings(window=0, window_s=0.0)
    with pytest.raises(ConfigError, match="js_threshold"):
        DriftSettings(js_threshold=2.0)
    with pytest.raises(ConfigError, match="min_samples"):
        DriftSettings(min_samples=-1)


def test_sampling_one_request_in_n_still_trips_and_stays_quiet(
        profile: ReferenceProfile, held_out: np.ndarray,
        run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
    settings = DriftSettings(window=200, min_samples=60, sample_every=3)
    quiet = DriftMonitor("digits", "1", profile, settings, seed=0)
    assert stream(quiet, held_out, run, 0) == []
    seen = quiet.headline()["samples"]
    assert 0 < seen < len(held_out) / 2  # about one request in three (requests hold 1-4 rows)
    loud = DriftMonitor("digits", "1", profile, settings, seed=1)
    assert len(stream(loud, shifts(held_out)["inversion"], run, 0)) == 1


def test_time_window_trips_then_forgets(profile: ReferenceProfile, held_out: np.ndarray,
                                        run: Callable[[np.ndarray], dict[str, np.ndarray]]) -> None:
    now = [100.0]
    settings = DriftSettings(window=0, window_s=60.0, min_samples=100, sample_every=1)
    monitor = DriftMonitor("digits", "1", profile, settings, clock=lambda: now[0])
    assert len(stream(monitor, shifts(held_out)["inversion"], run, 0)) == 1
    assert monitor.headline()["samples"] == len(held_out)
    now[0] += 30.0
    assert monitor.headline()["samples"] == len(held_out)  # still inside the window
    now[0] += 61.0
    assert monitor.headline()["samples"] == 0  # every pane expired
