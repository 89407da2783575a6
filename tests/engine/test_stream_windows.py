"""Window assembly (pure): chunks of any size give the same windows as slicing the whole signal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.engine.windows import WindowAssembler, WindowSpec, axis_from_layout, check_chunk
from edgert.errors import InputError


def expected_windows(signal: np.ndarray, window: int, hop: int, axis: int) -> list[np.ndarray]:
    n = signal.shape[axis]
    return [np.take(signal, range(s, s + window), axis=axis) for s in range(0, n - window + 1, hop)]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(0, 400),
    window=st.integers(1, 64),
    hop=st.integers(1, 80),
    cuts=st.lists(st.integers(1, 50), min_size=1, max_size=40),
    axis=st.sampled_from([0, 1]),
)
def test_windows_match_slicing_the_whole_signal(
    n: int, window: int, hop: int, cuts: list[int], axis: int
) -> None:
    rng = np.random.default_rng(n)
    signal = rng.standard_normal((n, 2) if axis == 0 else (2, n)).astype(np.float32)
    asm = WindowAssembler(WindowSpec(window, hop, axis))
    got: list[np.ndarray] = []
    pos, i = 0, 0
    while pos < n:
        step = cuts[i % len(cuts)]
        got += asm.push(np.take(signal, range(pos, min(n, pos + step)), axis=axis))
        pos += step
        i += 1
    want = expected_windows(signal, window, hop, axis)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
    # memory stays bounded: never more than a window plus one chunk
    assert asm.buffered < window + max(cuts)


def test_a_window_arrives_every_hop_of_10ms_audio_chunks() -> None:
    asm = WindowAssembler(WindowSpec(16000, 1600, 1))
    counts = [len(asm.push(np.zeros((1, 160), np.float32))) for _ in range(300)]
    first = counts.index(1)
    assert first == 99  # the 100th chunk completes the first 1 s window
    later = [i for i, c in enumerate(counts) if c]
    assert all(b - a == 10 for a, b in itertools.pairwise(later))  # then one every 100 ms


def test_windows_do_not_alias_the_pushed_chunk() -> None:
    asm = WindowAssembler(WindowSpec(4, 2, 0))
    chunk = np.arange(3, dtype=np.int32)
    asm.push(chunk)
    chunk[:] = -1  # a reused receive buffer
    (win,) = asm.push(np.array([3], np.int32))
    assert win.tolist() == [0, 1, 2, 3]


def test_check_chunk_names_expected_and_got() -> None:
    with pytest.raises(InputError) as err:
        check_chunk("audio", np.zeros(160, np.float64), np.dtype(np.float32), (1, None))
    text = str(err.value)
    assert "expected float32 with shape [1, *]" in text and "got float64 with shape [160]" in text
    check_chunk("audio", np.zeros((1, 7), np.float32), np.dtype(np.float32), (1, None))


def test_layout_names_the_time_axis() -> None:
    assert axis_from_layout("CT", 2) == 1
    assert axis_from_layout("wc", 2) == 0
    with pytest.raises(InputError, match="exactly one time axis"):
        axis_from_layout("CH", 2)
    with pytest.raises(InputError, match="each of the 3 item axes"):
        axis_from_layout("CT", 3)


def test_bad_window_spec_is_refused() -> None:
    with pytest.raises(InputError, match="window must be a positive"):
        WindowSpec(0, 1)
    with pytest.raises(InputError, match="hop must be a positive"):
        WindowSpec(4, 0)
