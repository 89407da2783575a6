"""A model's reference profile: what its inputs and outputs looked like on reference data. Pure numpy.

Per tensor, either

* ``"values"`` (inputs, and outputs that are not class scores): per-feature (or per-channel) mean
  and variance, quantile bin edges and the reference proportion in each bin; or
* ``"classes"`` (a 2-D float output with at least 2 columns): the distribution of the top class
  and the mean top-class confidence (softmax of the scores unless they already are probabilities).

It serializes to a small JSON document without JSON floats (the package manifest is canonical JSON
with no floats): arrays are ``"f32:<base64 of little-endian float32>"`` strings. The profile of
the digits model (64 features, 10 bins, 10 classes) is about 5 KB.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgert.drift.sketch import (
    DEFAULT_BINS,
    MAX_FEATURES,
    bin_counts,
    channel_axis,
    confidence_and_class,
    feature_rows,
    quantile_edges,
)
from edgert.errors import ModelError

__all__ = [
    "MAX_PROFILE_BYTES",
    "PROFILE_VERSION",
    "ClassProfile",
    "ReferenceProfile",
    "ValueProfile",
    "build_profile",
    "decode_array",
    "encode_array",
]

PROFILE_VERSION = 1
#: Largest serialized profile accepted (it rides in the package header, capped at 1 MiB).
MAX_PROFILE_BYTES = 256 * 1024
#: Fewest reference samples that make a profile worth having.
MIN_REFERENCE_SAMPLES = 20
_PREFIX = "f32:"
_HINT = "re-create the package with 'edgert package create ... --reference DATA.npz'"


def encode_array(a: np.ndarray) -> str:
    """``f32:<base64>`` of the array's little-endian float32 values (shape travels separately)."""
    return _PREFIX + base64.b64encode(np.asarray(a, "<f4").tobytes()).decode("ascii")


def decode_array(text: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`encode_array`; ModelError when the text or its size does not fit ``shape``."""
    if not isinstance(text, str) or not text.startswith(_PREFIX):
        raise ModelError("the reference profile holds a malformed array", hint=_HINT)
    try:
        raw = base64.b64decode(text[len(_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ModelError("the reference profile holds a malformed array", hint=_HINT) from None
    if len(raw) != 4 * int(np.prod(shape, dtype=np.int64)):
        raise ModelError(f"a reference profile array has {len(raw) // 4} values, expected shape {shape}",
                         hint=_HINT)
    return np.frombuffer(raw, "<f4").astype(np.float32).reshape(shape)


@dataclass(frozen=True)
class ValueProfile:
    """Per-feature statistics of one tensor: layout, mean, variance, bin edges, reference bin mix."""

    layout: str  # "feature" or "channel"
    axis: int | None  # channel axis within a sample ("channel" layout); None pools every value
    mean: np.ndarray  # (F,)
    var: np.ndarray  # (F,)
    edges: np.ndarray  # (F, bins - 1)
    reference: np.ndarray  # (F, bins) proportions

    @property
    def features(self) -> int:
        """Features (values per sample, or channels)."""
        return int(self.mean.shape[0])

    @property
    def bins(self) -> int:
        """Bins per feature."""
        return int(self.edges.shape[1]) + 1

    def rows(self, x: np.ndarray) -> np.ndarray:
        """A batch of this tensor as rows x features."""
        return feature_rows(x, self.layout, self.axis)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (no floats)."""
        return {"kind": "values", "layout": self.layout, "axis": self.axis, "features": self.features,
                "bins": self.bins, "mean": encode_array(self.mean), "var": encode_array(self.var),
                "edges": encode_array(self.edges), "reference": encode_array(self.reference)}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ValueProfile:
        """Parse the JSON form; ModelError names what is wrong."""
        f, b, layout, axis = int(doc["features"]), int(doc["bins"]), str(doc["layout"]), doc.get("axis")
        if layout not in ("feature", "channel") or not (0 < f <= 1 << 16 and 2 <= b <= 256):
            raise ModelError(f"reference profile: bad layout {layout!r}, {f} features or {b} bins",
                             hint=_HINT)
        if axis is not None and not isinstance(axis, int):
            raise ModelError(f"reference profile: bad channel axis {axis!r}", hint=_HINT)
        return cls(layout, axis, decode_array(doc["mean"], (f,)), decode_array(doc["var"], (f,)),
                   decode_array(doc["edges"], (f, b - 1)), decode_array(doc["reference"], (f, b)))

    @classmethod
    def build(cls, x: np.ndarray, bins: int = DEFAULT_BINS) -> ValueProfile:
        """Profile a batch of reference samples of one tensor."""
        shape = tuple(np.asarray(x).shape[1:])
        per_sample = int(np.prod(shape, dtype=np.int64)) if shape else 1
        layout, axis = ("feature", None) if per_sample <= MAX_FEATURES else ("channel", channel_axis(shape))
        rows = feature_rows(x, layout, axis).astype(np.float64)
        edges = quantile_edges(rows, bins)
        counts = bin_counts(rows.astype(np.float32), edges)
        return cls(layout, axis, rows.mean(axis=0).astype(np.float32), rows.var(axis=0).astype(np.float32),
                   edges, (counts / max(1, rows.shape[0])).astype(np.float32))


@dataclass(frozen=True)
class ClassProfile:
    """Class scores of one output: top-class distribution and mean top-class confidence."""

    softmax: bool  # True: the scores are logits (confidence = max softmax); False: probabilities
    distribution: np.ndarray  # (C,)
    confidence: float  # mean top-class confidence on the reference data

    @property
    def classes(self) -> int:
        """Number of classes."""
        return int(self.distribution.shape[0])

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (no floats)."""
        return {"kind": "classes", "classes": self.classes, "softmax": self.softmax,
                "distribution": encode_array(self.distribution),
                "confidence": encode_array(np.array([self.confidence]))}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ClassProfile:
        """Parse the JSON form."""
        c = int(doc["classes"])
        if not 2 <= c <= 1 << 16:
            raise ModelError(f"reference profile: bad class count {c}", hint=_HINT)
        return cls(bool(doc["softmax"]), decode_array(doc["distribution"], (c,)),
                   float(decode_array(doc["confidence"], (1,))[0]))

    @classmethod
    def build(cls, scores: np.ndarray) -> ClassProfile:
        """Profile reference class scores (rows x classes)."""
        s = np.asarray(scores, np.float32)
        probabilities = bool(s.min() >= 0.0 and np.allclose(s.sum(axis=1), 1.0, atol=1e-3))
        conf, top = confidence_and_class(s, softmax=not probabilities)
        dist = np.bincount(top, minlength=s.shape[1]) / s.shape[0]
        return cls(not probabilities, dist.astype(np.float32), float(conf.mean()))


def _is_classes(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[1] >= 2 and a.dtype.kind == "f"


@dataclass(frozen=True)
class ReferenceProfile:
    """Profiles of a model's inputs and outputs on ``samples`` reference samples."""

    samples: int
    inputs: dict[str, ValueProfile]
    outputs: dict[str, ValueProfile | ClassProfile]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document stored in the package manifest (``"reference"``)."""
        return {"v": PROFILE_VERSION, "samples": self.samples,
                "inputs": {k: v.to_dict() for k, v in self.inputs.items()},
                "outputs": {k: v.to_dict() for k, v in self.outputs.items()}}

    @classmethod
    def from_dict(cls, doc: Any) -> ReferenceProfile:
        """Parse a profile document; ModelError names what is wrong and how to fix it."""
        if not isinstance(doc, Mapping) or doc.get("v") != PROFILE_VERSION:
            version = doc.get("v") if isinstance(doc, Mapping) else None
            raise ModelError(f"reference profile version {version!r} is not supported (this edgert reads "
                             f"version {PROFILE_VERSION})", hint=_HINT)
        try:
            outputs: dict[str, ValueProfile | ClassProfile] = {}
            for k, v in dict(doc["outputs"]).items():
                kind = ClassProfile if v["kind"] == "classes" else ValueProfile
                outputs[str(k)] = kind.from_dict(v)
            inputs = {str(k): ValueProfile.from_dict(v) for k, v in dict(doc["inputs"]).items()}
            return cls(int(doc["samples"]), inputs, outputs)
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ModelError(f"the reference profile is malformed ({type(exc).__name__}: {exc})",
                             hint=_HINT) from None

    def summary(self) -> dict[str, Any]:
        """A short human view for ``inspect`` commands (means rounded, no bin tables)."""
        out: dict[str, Any] = {"samples": self.samples, "inputs": {}, "outputs": {}}
        for name, p in self.inputs.items():
            out["inputs"][name] = _value_summary(p)
        for name, q in self.outputs.items():
            if isinstance(q, ClassProfile):
                out["outputs"][name] = {"kind": "classes", "classes": q.classes,
                                        "distribution": [round(float(x), 4) for x in q.distribution],
                                        "mean_confidence": round(q.confidence, 4)}
            else:
                out["outputs"][name] = _value_summary(q)
        return out


def _value_summary(p: ValueProfile) -> dict[str, Any]:
    return {"kind": "values", "layout": p.layout, "features": p.features, "bins": p.bins,
            "mean": round(float(p.mean.mean()), 4), "std": round(float(np.sqrt(p.var.mean())), 4),
            "min_edge": round(float(p.edges.min()), 4), "max_edge": round(float(p.edges.max()), 4)}


def build_profile(inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], *,
                  bins: int = DEFAULT_BINS) -> ReferenceProfile:
    """The profile of reference ``inputs`` and the model's ``outputs`` on them (same sample count)."""
    arrays = [np.asarray(a) for a in (*inputs.values(), *outputs.values())]
    counts = {a.shape[0] if a.ndim else 1 for a in arrays}
    if len(counts) != 1:
        raise ModelError(f"reference inputs and outputs disagree on the sample count ({sorted(counts)})",
                         hint="every array in the reference .npz needs the same first dimension")
    samples = counts.pop()
    if samples < MIN_REFERENCE_SAMPLES:
        raise ModelError(f"the reference data holds {samples} samples; a profile needs at least "
                         f"{MIN_REFERENCE_SAMPLES}", hint="use a few hundred samples of the training data")
    outs: dict[str, ValueProfile | ClassProfile] = {}
    for name, a in outputs.items():
        arr = np.asarray(a)
        outs[name] = ClassProfile.build(arr) if _is_classes(arr) else ValueProfile.build(arr, bins)
    return ReferenceProfile(samples, {k: ValueProfile.build(v, bins) for k, v in inputs.items()}, outs)
