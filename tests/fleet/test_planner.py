"""Rollout planning (pure): waves, the advance/halt rule, the shadow gate. Property-based where it counts."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.errors import ConfigError
from edgert.fleet.planner import (
    DeviceProgress,
    Policy,
    ShadowReport,
    evaluate,
    parse_duration,
    parse_fraction,
    parse_waves,
    plan_waves,
    shadow_gate,
)

device_ids = st.lists(st.from_regex(r"[a-z0-9-]{1,12}", fullmatch=True), max_size=300, unique=True)
wave_lists = st.lists(st.integers(1, 99), max_size=5, unique=True).map(
    lambda ps: [p / 100 for p in sorted(ps)] + [1.0]
)


@settings(max_examples=200, deadline=None)
@given(devices=device_ids, waves=wave_lists, salt=st.text(max_size=8))
def test_waves_partition_every_device_once_and_first_wave_is_not_empty(devices, waves, salt) -> None:
    plan = plan_waves(devices, waves, salt=salt)
    flat = [d for w in plan for d in w]
    assert sorted(flat) == sorted(devices)  # each device exactly once
    assert all(plan), "no empty wave"
    if devices:
        assert len(plan[0]) >= 1
        # the first wave reaches its share (rounded up), never the whole group unless it must
        assert len(plan[0]) == min(len(devices), max(1, math.ceil(waves[0] * len(devices) - 1e-9)))


@settings(max_examples=100, deadline=None)
@given(devices=device_ids, waves=wave_lists)
def test_plan_is_deterministic_and_ignores_input_order(devices, waves) -> None:
    shuffled = list(devices)
    random.Random(7).shuffle(shuffled)
    assert plan_waves(devices, waves, salt="r1") == plan_waves(shuffled + devices[:3], waves, salt="r1")


@settings(max_examples=100, deadline=None)
@given(devices=device_ids, waves=wave_lists)
def test_cumulative_reach_never_exceeds_the_wave_share(devices, waves) -> None:
    plan = plan_waves(devices, waves)
    n = len(devices)
    allowed = sorted({min(n, max(1, math.ceil(f * n - 1e-9))) for f in waves[:-1]} | {n})
    reach = 0
    for w in plan:
        reach += len(w)
        assert reach in allowed


def test_thousand_devices_default_waves_sizes() -> None:
    plan = plan_waves([f"d{i:04d}" for i in range(1000)], salt="r")
    assert [len(w) for w in plan] == [10, 90, 400, 500]


def test_salt_changes_the_canary() -> None:
    devs = [f"d{i}" for i in range(200)]
    canaries = {tuple(plan_waves(devs, salt=f"r{i}")[0]) for i in range(10)}
    assert len(canaries) > 1


def test_parse_operator_input() -> None:
    assert parse_waves("1%,10%,50%,100%") == (0.01, 0.1, 0.5, 1.0)
    assert parse_fraction("5%") == 0.05 and parse_fraction("0.5") == 0.5
    assert parse_duration("5m") == 300.0 and parse_duration("90") == 90.0 and parse_duration("1.5h") == 5400
    for bad in ("10%,5%,100%", "1%,50%", "", "0%,100%", "x"):
        with pytest.raises(ConfigError):
            parse_waves(bad)
    with pytest.raises(ConfigError):
        parse_fraction("150%")
    with pytest.raises(ConfigError):
        parse_duration("5 minutes")


# -- evaluate --------------------------------------------------------------------------------------
POL = Policy(wait_healthy_s=300, max_failure_rate=0.05, min_attempts=10)


def dev(i: int, state: str | None = None, **kw) -> DeviceProgress:
    return DeviceProgress(f"d{i}", state=state, **kw)


def test_wave_advances_only_when_every_device_is_active() -> None:
    wave = [dev(0, "active", healthy=True), dev(1, "installing")]
    d = evaluate(wave, target_version="2", wave_started=0, now=10, policy=POL)
    assert d.action == "wait"
    wave[1] = dev(1, "active", healthy=True)
    assert evaluate(wave, target_version="2", wave_started=0, now=10, policy=POL).action == "advance"
    assert evaluate(wave, target_version="2", wave_started=0, now=10, policy=POL, last_wave=True).action \
        == "complete"


def test_status_version_counts_as_success_without_event() -> None:
    d = evaluate([dev(0, version="2")], target_version="2", wave_started=0, now=1, policy=POL)
    assert d.action == "advance"


def test_offline_device_blocks_until_wait_healthy_then_times_out_not_fails() -> None:
    wave = [dev(i, "active", healthy=True) for i in range(9)] + [dev(9, last_seen=0.0)]
    assert evaluate(wave, target_version="2", wave_started=0, now=299, policy=POL).action == "wait"
    d = evaluate(wave, target_version="2", wave_started=0, now=300, policy=POL)
    assert d.action == "advance" and d.counts["timed-out"] == 1 and d.counts["failed_total"] == 0


def test_canary_failure_halts_even_below_min_attempts() -> None:
    d = evaluate([dev(0, "failed", healthy=False)], target_version="2", wave_started=0, now=1, policy=POL)
    assert d.action == "halt" and "1/1" in d.reason and "5.0%" in d.reason


def test_large_wave_waits_for_min_attempts_before_judging_a_rate() -> None:
    wave = [dev(0, "failed")] + [dev(i, "active", healthy=True) for i in range(1, 5)] + \
        [dev(i, "downloading") for i in range(5, 100)]
    assert evaluate(wave, target_version="2", wave_started=0, now=1, policy=POL).action == "wait"
    wave[5:20] = [dev(i, "active", healthy=True) for i in range(5, 20)]  # 1 failed of 20 attempted: 5%
    assert evaluate(wave, target_version="2", wave_started=0, now=1, policy=POL).action == "wait"
    wave[20] = dev(20, "rolled-back")  # 2 of 21 = 9.5% > 5%
    d = evaluate(wave, target_version="2", wave_started=0, now=1, policy=POL)
    assert d.action == "halt" and "2/21" in d.reason


def test_earlier_waves_count_towards_the_rate() -> None:
    earlier = [dev(i, "active", healthy=True) for i in range(9)] + [dev(9, "failed")]
    wave = [dev(10 + i, "active", healthy=True) for i in range(10)]
    d = evaluate(wave, target_version="2", wave_started=0, now=1, policy=POL, earlier=earlier)
    assert d.action == "advance" and d.counts["failed_total"] == 1  # 1/20 = 5%, not above
    wave[0] = dev(10, "failed")
    assert evaluate(wave, target_version="2", wave_started=0, now=1, policy=POL, earlier=earlier).action \
        == "halt"


def test_a_wave_where_nobody_reported_halts_after_the_wait() -> None:
    d = evaluate([dev(0), dev(1)], target_version="2", wave_started=0, now=301, policy=POL)
    assert d.action == "halt" and "2 timed out" in d.reason


@settings(max_examples=300, deadline=None)
@given(
    states=st.lists(st.sampled_from([None, "downloading", "active", "failed", "rolled-back"]),
                    min_size=1, max_size=60),
    rate=st.floats(0, 1),
    elapsed=st.floats(0, 1000),
)
def test_evaluate_properties(states, rate, elapsed) -> None:
    pol = Policy(wait_healthy_s=300, max_failure_rate=rate, min_attempts=10)
    wave = [dev(i, s) for i, s in enumerate(states)]
    d = evaluate(wave, target_version="2", wave_started=0, now=elapsed, policy=pol)
    failed = sum(s in ("failed", "rolled-back") for s in states)
    ok = states.count("active")
    pending = len(states) - failed - ok
    # Never advance past a failure rate above the threshold.
    if failed and failed / (failed + ok) > rate:
        assert d.action in ("halt", "wait")
    if d.action == "advance":
        assert elapsed >= 300 or pending == 0
        assert ok >= 1
    if d.action == "halt" and "failure rate" in d.reason:
        assert failed / (failed + ok) > rate
    # Offline/pending devices are never failures.
    assert d.counts["failed_total"] == failed


# -- shadow gate -----------------------------------------------------------------------------------
def test_shadow_gate_promotes_only_within_bounds() -> None:
    good = [ShadowReport("a", 0.99, 1.2, 100), ShadowReport("b", 0.985, 1.1, 100)]
    kw = {"expected": 2, "min_agreement": 0.98, "max_latency_ratio": 1.5}
    assert shadow_gate(good[:1], **kw).action == "wait"
    assert shadow_gate(good, **kw).action == "advance"
    low = [ShadowReport("a", 0.99, 1.2, 100), ShadowReport("b", 0.90, 1.1, 300)]  # weighted 0.9225
    d = shadow_gate(low, **kw)
    assert d.action == "halt" and "0.9225 < 0.98" in d.reason
    slow = [ShadowReport("a", 0.99, 1.6, 100), ShadowReport("b", 0.99, 1.5, 100)]
    d = shadow_gate(slow, **kw)
    assert d.action == "halt" and "1.550 > 1.5" in d.reason
    assert shadow_gate([ShadowReport("a", float("nan"), 1.0, 10)], expected=1, min_agreement=0.5,
                       max_latency_ratio=2).action == "wait"
