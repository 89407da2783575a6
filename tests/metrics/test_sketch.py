"""QuantileSketch: relative-error guarantee against exact quantiles, merge, serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.metrics import QuantileSketch

ALPHA = 0.01
# Floating-point rounding at bucket edges may add a few ULPs to the 1% bound.
TOL = ALPHA * (1 + 1e-9)

values = st.lists(
    st.floats(min_value=1e-7, max_value=1e4, allow_nan=False, allow_infinity=False), min_size=1, max_size=400
)
quantiles = st.floats(min_value=0.0, max_value=1.0)


def exact(xs: list[float], q: float) -> float:
    return sorted(xs)[int(q * (len(xs) - 1))]


@settings(max_examples=300, deadline=None)
@given(values, quantiles)
def test_quantile_within_relative_error(xs: list[float], q: float) -> None:
    sketch = QuantileSketch(ALPHA)
    for x in xs:
        sketch.add(x)
    want = exact(xs, q)
    assert abs(sketch.quantile(q) - want) <= TOL * want


@settings(max_examples=150, deadline=None)
@given(values, values, quantiles)
def test_merge_equals_sketch_of_union(a: list[float], b: list[float], q: float) -> None:
    sa, sb, su = QuantileSketch(ALPHA), QuantileSketch(ALPHA), QuantileSketch(ALPHA)
    for x in a:
        sa.add(x)
        su.add(x)
    for x in b:
        sb.add(x)
        su.add(x)
    sa.merge(sb)
    assert sa.count == len(a) + len(b)
    assert sa.quantile(q) == su.quantile(q)
    want = exact(a + b, q)
    assert abs(sa.quantile(q) - want) <= TOL * want


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=1, max_size=200), quantiles
)
def test_signed_values_and_zero(xs: list[float], q: float) -> None:
    sketch = QuantileSketch(ALPHA)
    for x in xs:
        sketch.add(x)
    want = exact(xs, q)
    # Values within 1e-12 of zero are reported as 0: allow that absolute slack.
    assert abs(sketch.quantile(q) - want) <= TOL * abs(want) + 1e-12


@settings(max_examples=100, deadline=None)
@given(values, quantiles)
def test_json_round_trip_keeps_every_quantile(xs: list[float], q: float) -> None:
    sketch = QuantileSketch(ALPHA)
    for x in xs:
        sketch.add(x)
    doc = json.loads(json.dumps(sketch.to_dict()))
    back = QuantileSketch.from_dict(doc)
    assert back.count == sketch.count
    assert back.quantile(q) == sketch.quantile(q)
    assert math.isclose(back.sum, sketch.sum)


def test_subtract_gives_the_window() -> None:
    sketch = QuantileSketch()
    for x in np.linspace(1, 2, 100):
        sketch.add(float(x))
    base = sketch.copy()
    for x in np.linspace(100, 200, 50):
        sketch.add(float(x))
    window = sketch.subtract(base)
    assert window.count == 50
    assert 99 <= window.quantile(0.0) <= 101
    assert abs(window.quantile(0.5) - 150) <= 0.02 * 150


def test_compact_encoding_for_latencies() -> None:
    rng = np.random.default_rng(0)
    sketch = QuantileSketch()
    for x in rng.lognormal(mean=-9, sigma=0.5, size=10_000):  # ~120 us latencies
        sketch.add(float(x))
    assert len(json.dumps(sketch.to_dict())) < 2_000  # well under one MQTT message


def test_empty_and_nan() -> None:
    sketch = QuantileSketch()
    assert math.isnan(sketch.quantile(0.5))
    sketch.add(float("nan"))
    assert sketch.count == 0
    with pytest.raises(ValueError):
        sketch.quantile(1.5)


def test_bounded_bins_keep_high_quantiles() -> None:
    sketch = QuantileSketch(ALPHA, max_bins=64)
    xs = [10 ** (i / 100) for i in range(-600, 300)]  # 9 decades: far more than 64 buckets
    for x in xs:
        sketch.add(x)
    nonzero = sum(1 for _, counts in sketch.to_dict()["p"] for c in counts if c)
    assert nonzero <= 64
    want = exact(xs, 0.99)
    assert abs(sketch.quantile(0.99) - want) <= TOL * want


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"a": 0.01, "n": 2, "s": 1.0, "lo": 1, "hi": 1, "p": [[0, [1]]]},
        {"v": 9, "a": 0.01, "n": 0, "s": 0},
    ],
)
def test_malformed_dict_is_rejected(doc: dict) -> None:
    with pytest.raises(ValueError):
        QuantileSketch.from_dict(doc)


def test_merge_rejects_other_accuracy() -> None:
    with pytest.raises(ValueError):
        QuantileSketch(0.01).merge(QuantileSketch(0.02))
