"""A mergeable quantile sketch with bounded relative error (DDSketch, Masson et al., VLDB 2019).

Values are mapped to logarithmic buckets ``i = ceil(log_gamma(x))`` with
``gamma = (1 + alpha) / (1 - alpha)``; every value in bucket ``i`` lies in
``(gamma**(i-1), gamma**i]`` and is estimated as ``2 * gamma**i / (gamma + 1)``, which is within
``alpha`` relative error of any value in the bucket. Two sketches with the same ``alpha`` merge by
adding bucket counts, so devices can ship their sketches over MQTT and the fleet can merge them.

Memory is bounded by ``max_bins`` per sign: when exceeded, the lowest buckets collapse into one
(the high quantiles, which latency work cares about, keep their guarantee).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["DEFAULT_MAX_BINS", "DEFAULT_RELATIVE_ACCURACY", "QuantileSketch"]

#: 1% relative error on every quantile (the fleet telemetry contract).
DEFAULT_RELATIVE_ACCURACY = 0.01
#: 2048 buckets cover ~18 decades at 1% accuracy: far more than latencies need.
DEFAULT_MAX_BINS = 2048
# Values this close to zero go to the zero bucket (log() of them would overflow the index range).
_MIN_POSITIVE = 1e-12
_FORMAT_VERSION = 1


class _Store:
    """Dense-by-dict bucket counts with collapsing of the lowest buckets past ``max_bins``."""

    __slots__ = ("bins", "max_bins")

    def __init__(self, max_bins: int) -> None:
        self.bins: dict[int, int] = {}
        self.max_bins = max_bins

    def add(self, index: int, count: int = 1) -> None:
        bins = self.bins
        bins[index] = bins.get(index, 0) + count
        if len(bins) > self.max_bins:
            self._collapse()

    def _collapse(self) -> None:
        keys = sorted(self.bins)
        excess = len(keys) - self.max_bins
        target = keys[excess]
        moved = sum(self.bins.pop(k) for k in keys[:excess])
        self.bins[target] += moved

    def merge(self, other: _Store) -> None:
        for index, count in other.bins.items():
            self.bins[index] = self.bins.get(index, 0) + count
        while len(self.bins) > self.max_bins:
            self._collapse()


class QuantileSketch:
    """DDSketch: ``add`` values, ``merge`` sketches, read ``quantile(q)`` within ``alpha`` relative error."""

    __slots__ = ("_gamma", "_inv_log_gamma", "_neg", "_pos", "alpha", "count", "max", "min", "sum", "zero")

    def __init__(self, alpha: float = DEFAULT_RELATIVE_ACCURACY, max_bins: int = DEFAULT_MAX_BINS) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"relative accuracy must be in (0, 1), got {alpha}")
        self.alpha = alpha
        self._gamma = (1.0 + alpha) / (1.0 - alpha)
        self._inv_log_gamma = 1.0 / math.log(self._gamma)
        self._pos = _Store(max_bins)
        self._neg = _Store(max_bins)
        self.zero = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def _index(self, x: float) -> int:
        return math.ceil(math.log(x) * self._inv_log_gamma)

    def _value(self, index: int) -> float:
        return 2.0 * self._gamma**index / (self._gamma + 1.0)

    def add(self, x: float, count: int = 1) -> None:
        """Record ``x`` (``count`` times). NaN is ignored: it has no rank."""
        if x != x:  # NaN
            return
        if x > _MIN_POSITIVE:
            self._pos.add(self._index(x), count)
        elif x < -_MIN_POSITIVE:
            self._neg.add(self._index(-x), count)
        else:
            self.zero += count
        self.count += count
        self.sum += x * count
        if x < self.min:
            self.min = x
        if x > self.max:
            self.max = x

    def merge(self, other: QuantileSketch) -> None:
        """Add ``other``'s counts into this sketch (both must have the same ``alpha``)."""
        if not math.isclose(other.alpha, self.alpha, rel_tol=1e-12):
            raise ValueError(f"cannot merge sketches with relative accuracy {self.alpha} and {other.alpha}")
        self._pos.merge(other._pos)
        self._neg.merge(other._neg)
        self.zero += other.zero
        self.count += other.count
        self.sum += other.sum
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def copy(self) -> QuantileSketch:
        """Return an independent copy."""
        out = QuantileSketch(self.alpha, self._pos.max_bins)
        out.merge(self)
        return out

    def subtract(self, baseline: QuantileSketch) -> QuantileSketch:
        """Return the values added since ``baseline`` (an earlier copy of this sketch) as a new sketch.

        ``min``/``max`` of the result are bucket estimates, since exact extremes are not recoverable.
        """
        out = QuantileSketch(self.alpha, self._pos.max_bins)
        for store, base, dest in ((self._pos, baseline._pos, out._pos), (self._neg, baseline._neg, out._neg)):
            for index, count in store.bins.items():
                diff = count - base.bins.get(index, 0)
                if diff > 0:
                    dest.bins[index] = diff
        out.zero = self.zero - baseline.zero
        out.count = self.count - baseline.count
        out.sum = self.sum - baseline.sum
        if out.count > 0:
            out.min = out.quantile(0.0)
            out.max = out.quantile(1.0)
        return out

    def quantile(self, q: float) -> float:
        """Return the estimate of the value of rank ``floor(q * (count - 1))``; NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile must be in [0, 1], got {q}")
        if self.count == 0:
            return math.nan
        rank = int(q * (self.count - 1))
        seen = 0
        for index in sorted(self._neg.bins, reverse=True):
            seen += self._neg.bins[index]
            if seen > rank:
                return -self._value(index)
        seen += self.zero
        if seen > rank:
            return 0.0
        for index in sorted(self._pos.bins):
            seen += self._pos.bins[index]
            if seen > rank:
                return self._value(index)
        return self.max  # only reachable if counts were corrupted by from_dict

    def to_dict(self) -> dict[str, Any]:
        """Return a compact JSON-able form: bucket runs as ``[first_index, [counts...]]``."""
        doc: dict[str, Any] = {"v": _FORMAT_VERSION, "a": self.alpha, "n": self.count, "s": self.sum}
        if self.count:
            doc["lo"] = self.min
            doc["hi"] = self.max
        if self.zero:
            doc["z"] = self.zero
        if self._pos.bins:
            doc["p"] = _dense(self._pos.bins)
        if self._neg.bins:
            doc["m"] = _dense(self._neg.bins)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> QuantileSketch:
        """Rebuild a sketch from :meth:`to_dict` output; raises ValueError on malformed input."""
        try:
            if doc.get("v", _FORMAT_VERSION) != _FORMAT_VERSION:
                raise ValueError(f"unsupported sketch format version {doc.get('v')!r}")
            out = cls(float(doc["a"]))
            out.count = int(doc["n"])
            out.sum = float(doc["s"])
            out.zero = int(doc.get("z", 0))
            if out.count:
                out.min = float(doc["lo"])
                out.max = float(doc["hi"])
            _undense(doc.get("p"), out._pos)
            _undense(doc.get("m"), out._neg)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed quantile sketch: {exc!r}") from None
        total = out.zero + sum(out._pos.bins.values()) + sum(out._neg.bins.values())
        if total != out.count:
            raise ValueError(
                f"malformed quantile sketch: bucket counts sum to {total}, count says {out.count}"
            )
        return out


def _dense(bins: dict[int, int]) -> list[Any]:
    """Encode sparse buckets as runs ``[start, [c0, c1, ...]]``, splitting at gaps longer than 8."""
    runs: list[Any] = []
    keys = sorted(bins)
    start = prev = keys[0]
    counts = [bins[start]]
    for key in keys[1:]:
        if key - prev > 8:
            runs.append([start, counts])
            start, counts = key, []
        else:
            counts.extend([0] * (key - prev - 1))
        counts.append(bins[key])
        prev = key
    runs.append([start, counts])
    return runs


def _undense(runs: Any, store: _Store) -> None:
    if not runs:
        return
    for start, counts in runs:
        for offset, count in enumerate(counts):
            if count < 0:
                raise ValueError("malformed quantile sketch: negative bucket count")
            if count:
                store.add(int(start) + offset, int(count))
