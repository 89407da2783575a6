"""ResultCache: LRU order, byte accounting, key sensitivity and read-only entries."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.engine.cache import ENTRY_OVERHEAD_BYTES, ResultCache, cache_key


def out(n: int, fill: float = 0.0) -> dict[str, np.ndarray]:
    return {"y": np.full(n, fill, dtype=np.float32)}  # 4 * n bytes


def test_lru_eviction_and_byte_bound() -> None:
    entry = ENTRY_OVERHEAD_BYTES + 400
    cache = ResultCache(3 * entry)
    for k in (b"a", b"b", b"c"):
        assert cache.put(k, out(100))
    assert cache.bytes == 3 * entry
    assert cache.get(b"a") is not None  # a is now most recent
    cache.put(b"d", out(100))
    assert cache.get(b"b") is None  # least recently used went first
    assert {k for k in (b"a", b"c", b"d") if cache.get(k) is not None} == {b"a", b"c", b"d"}
    assert cache.bytes == 3 * entry <= cache.max_bytes


def test_replacing_a_key_keeps_accounting_exact() -> None:
    cache = ResultCache(10_000)
    cache.put(b"k", out(100))
    cache.put(b"k", out(10))
    assert len(cache) == 1
    assert cache.bytes == ENTRY_OVERHEAD_BYTES + 40
    cache.clear()
    assert cache.bytes == 0 and len(cache) == 0


def test_oversized_entry_is_not_stored_and_evicts_nothing() -> None:
    cache = ResultCache(1000)
    cache.put(b"small", out(10))
    assert not cache.put(b"big", out(1000))
    assert cache.get(b"small") is not None


def test_entries_are_copies_and_read_only() -> None:
    cache = ResultCache(10_000)
    value = out(4, 1.0)
    cache.put(b"k", value)
    value["y"][0] = 99  # caller mutating its own array must not change the cache
    hit = cache.get(b"k")
    assert hit is not None and hit["y"][0] == 1.0
    with pytest.raises(ValueError):
        hit["y"][0] = 5


def test_key_depends_on_everything_that_changes_the_answer() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = cache_key("m", "1", {"x": x}, None)
    assert base == cache_key("m", "1", {"x": x.copy()}, None)
    variants = [
        cache_key("m2", "1", {"x": x}, None),
        cache_key("m", "2", {"x": x}, None),
        cache_key("m", "1", {"x": x.reshape(3, 2)}, None),  # same bytes, other shape
        cache_key("m", "1", {"x": x.view(np.int32)}, None),  # same bytes, other dtype
        cache_key("m", "1", {"x": x + 1}, None),
        cache_key("m", "1", {"x": x}, ["logits"]),
        cache_key("m", "1", {"y": x}, None),
    ]
    assert base not in variants
    assert len(set(variants)) == len(variants)
    # Non-contiguous views hash by value.
    assert cache_key("m", "1", {"x": x.T}, None) == cache_key(
        "m", "1", {"x": np.ascontiguousarray(x.T)}, None
    )
