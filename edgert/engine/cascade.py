"""Pure cascade logic: per-row confidence rules and the choice of a threshold by measurement.

A cascade runs a small model on every row and sends only the rows it is unsure about to a large
model. Confidence is computed from the small model's logits:

- ``max_softmax``: the largest softmax probability; escalate when it is below the threshold.
- ``margin``: the gap between the two largest softmax probabilities; escalate when below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgert.errors import ConfigError

__all__ = [
    "DIGITS_DEFAULT_RULE",
    "DIGITS_DEFAULT_THRESHOLD",
    "RULES",
    "CascadeChoice",
    "choose_threshold",
    "confidence",
    "escalate_mask",
    "merge_rows",
]

RULES = ("max_softmax", "margin")
#: Chosen by measurement on models/digits_test.npz (360 held-out rows) with
#: ``python tools/bench_engine.py --only cascade``: at 0.95 the cascade matches the large model's
#: 99.44% on both the fp32 and int8 ONNX pairs at 35% of its FLOPs (34% of rows escalate). 0.9 is
#: cheaper (25%) but sits exactly on the 0.3 pt bound (one test row), too little margin to ship.
DIGITS_DEFAULT_RULE = "max_softmax"
DIGITS_DEFAULT_THRESHOLD = 0.95


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (stable for large logits)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def confidence(logits: np.ndarray, rule: str) -> np.ndarray:
    """Return one confidence value per row of ``logits`` [N, C] under ``rule``."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ConfigError(
            f"cascade output must be [N, classes] logits with at least 2 classes, got shape {logits.shape}",
            hint="point the cascade's output at the classifier's logits tensor",
        )
    p = softmax(logits)
    if rule == "max_softmax":
        return p.max(axis=1)
    if rule == "margin":
        top2 = np.partition(p, -2, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]
    raise ConfigError(f"unknown cascade rule {rule!r}", hint=f"use one of {', '.join(RULES)}")


def escalate_mask(logits: np.ndarray, rule: str, threshold: float) -> np.ndarray:
    """Return a boolean mask of rows whose confidence is below ``threshold`` (they go to the large model)."""
    conf = confidence(logits, rule)
    # NaN logits give NaN confidence: escalate them rather than trusting them.
    return ~(conf >= threshold)


def merge_rows(
    small: dict[str, np.ndarray], large: dict[str, np.ndarray], mask: np.ndarray
) -> dict[str, np.ndarray]:
    """Return ``small`` with the rows selected by ``mask`` replaced by ``large``'s rows (in order)."""
    out = dict(small)
    for name, rows in large.items():
        if name in out:
            merged = np.array(out[name], copy=True)
            merged[mask] = rows
            out[name] = merged
    return out


@dataclass(frozen=True)
class CascadeChoice:
    """The outcome of a threshold sweep: threshold, accuracy, escalation rate and relative compute."""

    rule: str
    threshold: float
    accuracy: float
    large_accuracy: float
    small_accuracy: float
    escalation_rate: float
    relative_compute: float  # mean cascade cost / large model cost


def evaluate(
    small_logits: np.ndarray,
    large_logits: np.ndarray,
    labels: np.ndarray,
    rule: str,
    threshold: float,
    small_cost: float,
    large_cost: float,
) -> CascadeChoice:
    """Score one (rule, threshold) on a labelled set: accuracy and compute relative to the large model."""
    mask = escalate_mask(small_logits, rule, threshold)
    pred = np.where(mask, large_logits.argmax(axis=1), small_logits.argmax(axis=1))
    rate = float(mask.mean())
    return CascadeChoice(
        rule=rule,
        threshold=threshold,
        accuracy=float((pred == labels).mean()),
        large_accuracy=float((large_logits.argmax(axis=1) == labels).mean()),
        small_accuracy=float((small_logits.argmax(axis=1) == labels).mean()),
        escalation_rate=rate,
        relative_compute=(small_cost + rate * large_cost) / large_cost,
    )


def choose_threshold(
    small_logits: np.ndarray,
    large_logits: np.ndarray,
    labels: np.ndarray,
    *,
    small_cost: float,
    large_cost: float,
    max_accuracy_drop: float = 0.003,
    rules: Sequence[str] = RULES,
    thresholds: Sequence[float] | None = None,
) -> CascadeChoice:
    """Pick the cheapest (rule, threshold) whose accuracy is within ``max_accuracy_drop`` of the large model.

    Costs are per-row (FLOPs or measured seconds); only their ratio matters. If no threshold meets
    the accuracy bound, the most accurate one is returned (callers compare it to their target).
    """
    grid = list(thresholds) if thresholds is not None else [round(x, 3) for x in np.arange(0.05, 1.0, 0.005)]
    candidates = [
        evaluate(small_logits, large_logits, labels, rule, t, small_cost, large_cost)
        for rule in rules
        for t in grid
    ]
    ok = [c for c in candidates if c.accuracy >= c.large_accuracy - max_accuracy_drop]
    if ok:
        return min(ok, key=lambda c: (c.relative_compute, -c.accuracy))
    return max(candidates, key=lambda c: (c.accuracy, -c.relative_compute))
