"""Pure cascade rules: confidence, escalation mask, row merge and threshold choice."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.engine.cascade import choose_threshold, confidence, escalate_mask, merge_rows
from edgert.errors import ConfigError


def test_max_softmax_and_margin() -> None:
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]]))
    np.testing.assert_allclose(confidence(logits, "max_softmax"), [0.7, 0.4])
    np.testing.assert_allclose(confidence(logits, "margin"), [0.5, 0.05])
    np.testing.assert_array_equal(escalate_mask(logits, "max_softmax", 0.5), [False, True])
    np.testing.assert_array_equal(escalate_mask(logits, "margin", 0.3), [False, True])
    np.testing.assert_array_equal(escalate_mask(logits, "margin", 0.04), [False, False])


def test_nan_rows_escalate_and_big_logits_are_stable() -> None:
    logits = np.array([[np.nan, 0.0], [1000.0, 0.0]])
    np.testing.assert_array_equal(escalate_mask(logits, "max_softmax", 0.9), [True, False])


def test_bad_rule_or_shape() -> None:
    with pytest.raises(ConfigError, match="unknown cascade rule"):
        confidence(np.zeros((2, 3)), "entropy")
    with pytest.raises(ConfigError, match="logits"):
        confidence(np.zeros(3), "margin")


def test_merge_rows_replaces_only_masked_rows_in_order() -> None:
    small = {"logits": np.zeros((4, 2)), "extra": np.ones(4)}
    large = {"logits": np.array([[1.0, 1.0], [2.0, 2.0]])}
    mask = np.array([False, True, False, True])
    merged = merge_rows(small, large, mask)
    np.testing.assert_array_equal(merged["logits"], [[0, 0], [1, 1], [0, 0], [2, 2]])
    assert small["logits"].sum() == 0  # inputs untouched


def test_choose_threshold_picks_cheapest_that_meets_accuracy() -> None:
    rng = np.random.default_rng(0)
    n = 1000
    labels = rng.integers(0, 2, n)
    large = np.eye(2)[labels] * 5  # always right
    # Small model: confident and right on 80%, unsure (and wrong) on 20%.
    unsure = rng.random(n) < 0.2
    small = np.where(unsure[:, None], np.eye(2)[1 - labels] * 0.1, np.eye(2)[labels] * 5)
    choice = choose_threshold(small, large, labels, small_cost=1, large_cost=10, max_accuracy_drop=0.0)
    assert choice.accuracy == 1.0
    assert choice.escalation_rate == pytest.approx(unsure.mean())
    assert choice.relative_compute == pytest.approx(0.1 + unsure.mean())
