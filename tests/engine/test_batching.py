"""Pure batching policy: plan_batch decisions and join/split round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.engine.batching import WAIT, batch_rows, join_inputs, plan_batch, split_outputs
from edgert.errors import BackendError


@pytest.mark.parametrize(
    ("rows", "max_batch", "preferred", "expired", "want"),
    [
        ([], 8, (), True, WAIT),
        ([1, 1], 8, (), False, WAIT),  # room to grow, deadline not reached: wait
        ([1, 1], 8, (), True, 2),  # deadline: run with what we have
        ([4, 4, 1], 8, (), False, 2),  # exactly full
        ([4, 3, 2], 8, (), False, 2),  # next one does not fit: run now
        ([9, 1], 8, (), False, 1),  # oversized request runs alone
        ([1, 1, 1], 8, (2, 4), False, 2),  # preferred size reached
        ([1, 1, 1, 1, 1], 8, (2, 4), False, 4),  # largest preferred size reachable
        ([3, 3], 8, (2, 4), False, WAIT),  # no preferred size reachable yet
        ([3, 3], 8, (2, 4), True, 2),
    ],
)
def test_plan_batch(rows: list[int], max_batch: int, preferred: tuple, expired: bool, want: int) -> None:
    assert plan_batch(rows, max_batch, preferred, expired) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=40), st.integers(1, 32), st.booleans())
def test_plan_never_exceeds_max_batch(rows: list[int], max_batch: int, expired: bool) -> None:
    take = plan_batch(rows, max_batch, (), expired)
    assert 0 <= take <= len(rows)
    if take > 1:
        assert sum(rows[:take]) <= max_batch
    if expired:
        assert take >= 1  # an expired queue always makes progress


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=12))
def test_join_then_split_round_trips(rows: list[int]) -> None:
    rng = np.random.default_rng(len(rows))
    reqs = [
        {"a": rng.normal(size=(n, 3)).astype(np.float32), "b": rng.integers(0, 9, size=(n,))} for n in rows
    ]
    joined = join_inputs(reqs)
    assert joined["a"].shape == (sum(rows), 3)
    assert batch_rows(joined) == sum(rows)
    # The "model" here is the identity; outputs split back to each request's own rows.
    parts = split_outputs(joined, rows)
    for req, part in zip(reqs, parts, strict=True):
        np.testing.assert_array_equal(req["a"], part["a"])
        np.testing.assert_array_equal(req["b"], part["b"])


def test_split_rejects_outputs_without_batch_axis() -> None:
    with pytest.raises(BackendError, match="max_batch_size = 0"):
        split_outputs({"x": np.zeros((3, 2))}, [2, 2])
