"""Drift sketches: exact bin counts, a window that holds a true suffix of bounded size, PSI/JS laws."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.drift.profile import ReferenceProfile, build_profile, decode_array, encode_array
from edgert.drift.sketch import (
    Binner,
    PsiReference,
    SlidingPanes,
    bin_counts,
    feature_rows,
    js_divergence,
    psi,
    quantile_edges,
)
from edgert.errors import ModelError

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False, width=32)


def matrix(rows: int, features: int) -> st.SearchStrategy[np.ndarray]:
    return st.lists(finite, min_size=rows * features, max_size=rows * features).map(
        lambda xs: np.array(xs, np.float32).reshape(rows, features))


def slow_counts(rows: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The definition, one feature at a time: bin = number of edges strictly below the value."""
    out = np.zeros((edges.shape[0], edges.shape[1] + 1), np.int64)
    for f in range(edges.shape[0]):
        idx = np.searchsorted(edges[f], rows[:, f], side="left")
        out[f] = np.bincount(idx, minlength=edges.shape[1] + 1)
    return out


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(2, 12), st.data())
def test_bin_counts_match_the_definition(n: int, features: int, bins: int, data: st.DataObject) -> None:
    ref = data.draw(matrix(max(n, 2), features))
    live = data.draw(matrix(n, features))
    edges = quantile_edges(ref, bins)
    counts = bin_counts(live, edges)
    assert counts.shape == (features, bins)
    assert (counts.sum(axis=1) == n).all()
    np.testing.assert_array_equal(counts, slow_counts(live, edges))


@settings(max_examples=100, deadline=None)
@given(st.integers(50, 400), st.integers(2, 12), st.integers(0, 2**32 - 1))
def test_quantile_bins_hold_bounded_mass(n: int, bins: int, seed: int) -> None:
    """On distinct values each reference bin holds 1/bins of the data, within 2/n."""
    x = np.random.default_rng(seed).permutation(n).astype(np.float32).reshape(n, 1) * 0.5
    counts = bin_counts(x, quantile_edges(x, bins))[0] / n
    assert np.abs(counts - 1.0 / bins).max() <= 2.0 / n + 1e-9


@settings(max_examples=150, deadline=None)
@given(st.integers(8, 200), st.integers(2, 10), st.lists(st.integers(1, 9), min_size=1, max_size=120))
def test_count_window_is_an_exact_suffix_of_bounded_length(window: int, panes: int,
                                                           batches: list[int]) -> None:
    edges = np.array([[2.5, 5.5]], np.float32)
    w = SlidingPanes({"h": (1, 3)}, window_rows=window, panes=panes)
    stream: list[float] = []
    for i, b in enumerate(batches):
        vals = (np.arange(b, dtype=np.float32) + i) % 9
        stream += vals.tolist()
        w.add(b, h=bin_counts(vals.reshape(-1, 1), edges))
        kept = w.count
        assert 0 < kept <= len(stream)
        suffix = np.array(stream[len(stream) - kept:], np.float32).reshape(-1, 1)
        np.testing.assert_array_equal(w.total("h"), bin_counts(suffix, edges))  # exact over what it keeps
        pane = w.pane_rows
        assert kept <= pane * panes + (panes - 1) * (max(batches) - 1)
        if len(stream) >= pane * panes:
            assert kept >= pane * (panes - 1)  # never less than the window minus one pane


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=60), st.floats(1.0, 20.0), st.integers(2, 8))
def test_time_window_keeps_recent_rows_and_drops_old_ones(gaps: list[float], window_s: float,
                                                          panes: int) -> None:
    now = [1000.0]
    w = SlidingPanes({"n": ()}, window_s=window_s, panes=panes, clock=lambda: now[0])
    times: list[float] = []
    for g in gaps:
        now[0] += g
        times.append(now[0])
        w.add(1, n=np.asarray(1.0))
    kept = w.count
    assert float(w.total("n")) == kept
    recent = sum(t > now[0] - (window_s - window_s / panes) for t in times)
    anything_in_window = sum(t > now[0] - window_s - window_s / panes for t in times)
    assert recent <= kept <= anything_in_window


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 12), st.data())
def test_psi_and_js_laws(bins: int, data: st.DataObject) -> None:
    p = np.array(data.draw(st.lists(st.integers(0, 50), min_size=bins, max_size=bins)), np.float64)
    q = np.array(data.draw(st.lists(st.integers(0, 50), min_size=bins, max_size=bins)), np.float64)
    p[0] += 1
    q[-1] += 1
    assert psi(p, q)[()] >= -1e-12
    assert PsiReference(p).psi(q)[()] == pytest.approx(psi(p, q)[()], rel=1e-9, abs=1e-12)
    assert abs(psi(p, 3 * p)[()]) < 1e-12  # same mix, any scale
    js = js_divergence(p, q)
    assert -1e-12 <= js <= 1.0 + 1e-12
    assert js == pytest.approx(js_divergence(q, p), abs=1e-12)
    assert js_divergence(p, p * 7) == pytest.approx(0.0, abs=1e-12)


def test_psi_of_samples_from_the_reference_itself_is_small() -> None:
    """The sampling error of PSI with 10 bins: well under the 0.1 'no change' line at 1,000 rows."""
    rng = np.random.default_rng(7)
    ref = rng.normal(size=(20000, 4)).astype(np.float32)
    edges = quantile_edges(ref, 10)
    reference = bin_counts(ref, edges)
    scores = [psi(reference, bin_counts(rng.normal(size=(1000, 4)).astype(np.float32), edges)).mean()
              for _ in range(20)]
    assert max(scores) < 0.03
    shifted = psi(reference, bin_counts(rng.normal(0.5, 1.0, size=(1000, 4)).astype(np.float32), edges))
    assert shifted.min() > 0.1  # half a standard deviation of shift is seen


def test_feature_rows_layouts() -> None:
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)  # NCHW
    rows = feature_rows(x, "channel", 0)
    assert rows.shape == (2 * 16, 3)
    np.testing.assert_array_equal(rows[:16, 1], x[0, 1].ravel())
    nhwc = np.moveaxis(x, 1, -1)
    np.testing.assert_array_equal(feature_rows(nhwc, "channel", 2), rows)
    assert feature_rows(x, "feature").shape == (2, 48)
    big = np.zeros((1, 3, 224, 224), np.float32)
    assert feature_rows(big, "channel", 0).shape[0] <= 256  # a fixed subsample per sample


@settings(max_examples=60, deadline=None)
@given(st.integers(20, 80), st.integers(1, 5), st.integers(2, 6), st.integers(0, 2**32 - 1))
def test_profile_round_trips_through_json_exactly(n: int, features: int, classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype(np.float32)
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    profile = build_profile({"x": x}, {"logits": logits, "score": logits[:, :1]})
    text = json.dumps(profile.to_dict(), sort_keys=True)
    back = ReferenceProfile.from_dict(json.loads(text))
    assert json.dumps(back.to_dict(), sort_keys=True) == text
    assert back.outputs["logits"].to_dict()["kind"] == "classes"
    assert back.outputs["score"].to_dict()["kind"] == "values"


def test_profile_json_has_no_floats() -> None:
    """The manifest is canonical JSON without floats: every number in a profile is an integer."""
    rng = np.random.default_rng(0)
    doc = build_profile({"x": rng.normal(size=(50, 3))}, {"y": rng.normal(size=(50, 4))}).to_dict()

    def numbers(o: object) -> list[object]:
        if isinstance(o, dict):
            return [x for v in o.values() for x in numbers(v)]
        return [o] if isinstance(o, (int, float)) and not isinstance(o, bool) else []

    assert numbers(doc) and all(isinstance(v, int) for v in numbers(doc))


def test_bad_profiles_are_refused_clearly() -> None:
    with pytest.raises(ModelError, match="version"):
        ReferenceProfile.from_dict({"v": 99})
    with pytest.raises(ModelError, match="malformed"):
        ReferenceProfile.from_dict({"v": 1, "samples": 5, "inputs": {"x": {"kind": "values"}}, "outputs": {}})
    with pytest.raises(ModelError, match="expected shape"):
        decode_array(encode_array(np.zeros(3)), (4,))
    with pytest.raises(ModelError, match="at least"):
        build_profile({"x": np.zeros((3, 2))}, {"y": np.zeros((3, 2))})
    with pytest.raises(ModelError, match="sample count"):
        build_profile({"x": np.zeros((30, 2))}, {"y": np.zeros((31, 2))})


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(2, 40), st.data())
def test_fast_binner_matches_the_definition(n: int, features: int, bins: int, data: st.DataObject) -> None:
    """Both strategies (compare for <= 16 edges, search beyond), with values far outside the reference
    range, values equal to edges, NaN and infinities."""
    ref = data.draw(matrix(max(n, 2), features))
    edges = quantile_edges(ref, bins)
    live = data.draw(st.one_of(matrix(n, features), matrix(n, features).map(lambda m: m * 1e4)))
    specials = data.draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0]), max_size=3))
    for i, value in enumerate(specials):
        live[i % n, i % features] = value
    if n > 1:
        live[-1] = edges[:, 0]  # exactly on an edge: goes below it
    np.testing.assert_array_equal(Binner(edges).counts(live), bin_counts(live, edges))


def test_monitor_copies_writable_inputs_and_keeps_read_only_views() -> None:
    """A caller that reuses its input buffer after the request cannot change what the window saw."""
    from edgert.drift import DriftMonitor, DriftSettings

    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 3)).astype(np.float32)
    profile = build_profile({"x": x}, {"y": rng.normal(size=(200, 2)).astype(np.float32)})
    monitor = DriftMonitor("m", "1", profile, DriftSettings(window=1000, min_samples=0, sample_every=1))
    buf = np.zeros((1, 3), np.float32)
    frozen = np.frombuffer(np.full((1, 3), 5.0, np.float32).tobytes(), np.float32).reshape(1, 3)
    for i in range(10):
        buf[:] = i - 5.0  # the caller reuses one buffer for every request
        monitor.observe({"x": buf}, {"y": np.zeros((1, 2), np.float32)})
        monitor.observe({"x": frozen}, {"y": np.zeros((1, 2), np.float32)})
    monitor.flush()
    counts = monitor.window.total("in:x")
    seen = np.vstack([np.full((10, 3), 5.0), (np.arange(10) - 5.0)[:, None] * np.ones((1, 3))])
    expected = bin_counts(seen.astype(np.float32), profile.inputs["x"].edges)
    np.testing.assert_array_equal(counts, expected)
