"""Live drift of one served model version against its reference profile. Pure (numpy in, scores out).

:meth:`DriftMonitor.observe` is the request-path hook: it copies the request's tensors into a
staging list (a few hundred nanoseconds) and, every :data:`FLUSH_ROWS` rows, folds the staged
batch into the sliding-window sketches with a handful of vectorized numpy calls. After each fold
the scores are compared with the thresholds; crossing one returns a :class:`DriftAlarm` once
(hysteresis: the alarm re-arms when every score is back under ``REARM_FRACTION`` of its
threshold, and :attr:`DriftSettings.event_interval_s` spaces alarms out).

Scores over the window:

* ``psi``: per input tensor, the mean over its features of the population stability index
  (0: same mix; 0.1-0.25 moderate shift; > 0.25 large shift). ``psi_max`` is the worst feature.
* ``js``: per class output, the Jensen-Shannon divergence (base 2, 0..1) between the reference and
  live distributions of the predicted class.
* ``confidence``: per class output, the mean top-class confidence; ``confidence_drop`` is the
  reference mean minus it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.drift.profile import ClassProfile, ReferenceProfile, ValueProfile
from edgert.drift.sketch import (
    DEFAULT_PANES,
    Binner,
    PsiReference,
    SlidingPanes,
    confidence_and_class,
    js_divergence,
)
from edgert.errors import ConfigError

__all__ = ["FLUSH_ROWS", "REARM_FRACTION", "DriftAlarm", "DriftMonitor", "DriftSettings"]

#: Staged rows folded into the sketches at once (amortizes numpy's per-call cost on tiny models); a
#: fold never holds more than one pane of the window.
FLUSH_ROWS = 256
#: An alarm re-arms when every score is below this fraction of its threshold.
REARM_FRACTION = 0.8


@dataclass(frozen=True)
class DriftSettings:
    """Window and thresholds of live drift (the ``[models.drift]`` table; defaults in docs/drift.md)."""

    enabled: bool = True
    window: int = 2000  # rows in a count window (0: use window_s)
    window_s: float = 0.0  # seconds in a time window (used when window = 0)
    min_samples: int = 200  # rows in the window before scores are judged
    psi_threshold: float = 0.25
    js_threshold: float = 0.1
    confidence_drop: float = 0.15
    event_interval_s: float = 300.0  # least time between two drift events of one model
    capture_samples: int = 0  # requests sealed to the fleet capture key after a drift event
    capture_fleet_key: str = ""  # x25519:... (default: the model's capture config key)
    panes: int = DEFAULT_PANES
    sample_every: int = 4  # observe one request in N on average (1: every request)

    def __post_init__(self) -> None:
        if (self.window > 0) == (self.window_s > 0):
            raise ConfigError(f"drift: set exactly one of window (rows, now {self.window}) and window_s "
                              f"(seconds, now {self.window_s}) to a positive value",
                              hint="e.g. window = 1000, or window = 0 with window_s = 600")
        for key in ("min_samples", "capture_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"drift: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("psi_threshold", "js_threshold", "confidence_drop", "event_interval_s"):
            if not getattr(self, key) >= 0:
                raise ConfigError(f"drift: {key} must be >= 0, got {getattr(self, key)}")
        if self.js_threshold > 1:
            raise ConfigError(f"drift: js_threshold is a base-2 divergence in [0, 1], "
                              f"got {self.js_threshold}")
        if self.panes < 2:
            raise ConfigError(f"drift: panes must be >= 2, got {self.panes}")
        if self.sample_every < 1:
            raise ConfigError(f"drift: sample_every must be >= 1, got {self.sample_every}")


@dataclass(frozen=True)
class DriftAlarm:
    """A threshold crossing: which scores crossed, and every score at that moment."""

    model: str
    version: str
    crossed: tuple[str, ...]
    scores: dict[str, Any] = field(default_factory=dict)


class DriftMonitor:
    """Sliding-window sketches of one model version against its profile (thread-safe)."""

    def __init__(self, model: str, version: str, profile: ReferenceProfile, settings: DriftSettings, *,
                 clock: Callable[[], float] = time.monotonic, seed: int | None = None) -> None:
        self.model, self.version, self.profile, self.settings = model, version, profile, settings
        self.clock = clock
        shapes: dict[str, tuple[int, ...]] = {}
        for name, p in profile.inputs.items():
            shapes[f"in:{name}"] = (p.features, p.bins)
        for name, q in profile.outputs.items():
            if isinstance(q, ClassProfile):
                shapes[f"cls:{name}"] = (q.classes,)
                shapes[f"conf:{name}"] = ()
            else:
                shapes[f"out:{name}"] = (q.features, q.bins)
        self.window = SlidingPanes(shapes, window_rows=settings.window, window_s=settings.window_s,
                                   panes=settings.panes, clock=clock)
        # A fold lands in one pane: never fold more than a pane holds, so the window stays near its size.
        self._flush_rows = min(FLUSH_ROWS, self.window.pane_rows or FLUSH_ROWS)
        self.observed = 0
        self.alarms = 0
        self._lock = threading.Lock()
        # Per profiled tensor, in a fixed order: its window key, its profile and what to stage of it.
        self._in_names, self._out_names = list(profile.inputs), list(profile.outputs)
        self._in_keys, self._out_keys = frozenset(profile.inputs), frozenset(profile.outputs)
        # (staged arrays, tensor name, what to stage of it) per tensor: one column per tensor
        self._in_columns: list[tuple[list[np.ndarray], str, Callable[[np.ndarray], np.ndarray]]] = [
            ([], n, _stager(p, copy=True)) for n, p in profile.inputs.items()]
        self._out_columns: list[tuple[list[np.ndarray], str, Callable[[np.ndarray], np.ndarray]]] = [
            ([], n, _stager(q, copy=False)) for n, q in profile.outputs.items()]
        self._reduce = any(isinstance(p, ValueProfile) and p.layout == "channel" for p in
                           (*profile.inputs.values(), *profile.outputs.values()))
        self._keys = [f"in:{n}" for n in profile.inputs]
        self._keys += [("cls:" if isinstance(q, ClassProfile) else "out:") + n
                       for n, q in profile.outputs.items()]
        self._profiles = [*profile.inputs.values(), *profile.outputs.values()]
        self._psi = {k: PsiReference(p.reference) for k, p in zip(self._keys, self._profiles, strict=True)
                     if isinstance(p, ValueProfile)}
        self._binners = {k: Binner(p.edges) for k, p in zip(self._keys, self._profiles, strict=True)
                         if isinstance(p, ValueProfile)}
        self._staged_rows = 0
        self._pane_s = self.window.pane_s
        self._every, self._skip = settings.sample_every, 0
        self._rng = random.Random(seed)
        self._armed = True
        self._last_alarm = -float("inf")
        self._last_fold = clock()

    # -- request path --------------------------------------------------------------------------------
    def observe(self, inputs: Mapping[str, np.ndarray],
                outputs: Mapping[str, np.ndarray]) -> DriftAlarm | None:
        """Stage one answered request; fold when enough rows wait. Returns an alarm when one fires.

        A request that lacks a profiled tensor (a client asked for a subset of the outputs) is skipped.
        Writable inputs are copied (a caller may reuse its buffers once the request is answered);
        images are reduced to their subsample first. With ``sample_every`` N > 1 about one request in N
        is (the gaps are random, uniform in 1..2N-1).
        """
        if self._every > 1:  # random spacing (mean N): periodic traffic cannot alias with the sampling
            self._skip -= 1
            if self._skip > 0:
                return None
            self._skip = self._rng.randint(1, 2 * self._every - 1)
        if not (self._in_keys <= inputs.keys() and self._out_keys <= outputs.keys()):
            return None
        if self._reduce:  # images: keep only their subsample
            for column, name, stage in self._in_columns:
                column.append(stage(inputs[name]))
            for column, name, stage in self._out_columns:
                column.append(stage(outputs[name]))
            rows = len(inputs[self._in_names[0]]) if self._in_names else len(outputs[self._out_names[0]])
        else:
            rows = 0
            for column, name, _ in self._in_columns:
                a = inputs[name]
                # A read-only array is a view of an immutable request body: nothing can change it.
                column.append(a.copy() if a.flags.writeable else a)
                rows = len(a)
            for column, name, _ in self._out_columns:
                a = outputs[name]
                column.append(a)
                rows = rows or len(a)
        self._staged_rows += rows
        if self._staged_rows < self._flush_rows and not (
                self._pane_s and self.clock() - self._last_fold >= self._pane_s):
            return None
        return self.flush()

    def flush(self) -> DriftAlarm | None:
        """Fold the staged requests into the window and judge the scores."""
        with self._lock:
            rows, self._staged_rows = self._staged_rows, 0
            self._last_fold = self.clock()
            if rows:
                columns = []
                for column, _, _ in (*self._in_columns, *self._out_columns):
                    columns.append(np.concatenate(column))
                    column.clear()
                self._fold(columns, rows)
            return self._judge()

    def _fold(self, columns: list[np.ndarray], rows: int) -> None:
        sums: dict[str, np.ndarray] = {}
        for key, profile, a in zip(self._keys, self._profiles, columns, strict=True):
            if isinstance(profile, ClassProfile):
                conf, top = confidence_and_class(a.reshape(a.shape[0], -1), profile.softmax)
                sums[key] = np.bincount(top, minlength=profile.classes)[: profile.classes]
                sums["conf:" + key[4:]] = np.asarray(conf.sum(dtype=np.float64))
            else:
                sums[key] = self._binners[key].counts(_as_rows(profile, a))
        self.window.add(rows, **sums)
        self.observed += rows

    # -- scores ------------------------------------------------------------------------------------
    def _compute(self) -> dict[str, Any]:
        w = self.window
        out: dict[str, Any] = {"samples": w.count, "inputs": {}, "outputs": {}}
        for name in self.profile.inputs:
            out["inputs"][name] = _psi_scores(self._psi[f"in:{name}"], w.total(f"in:{name}"))
        for name, q in self.profile.outputs.items():
            if isinstance(q, ClassProfile):
                counts = w.total(f"cls:{name}")
                n = float(counts.sum())
                conf = float(w.total(f"conf:{name}")) / n if n else float("nan")
                out["outputs"][name] = {"js": js_divergence(q.distribution, counts) if n else float("nan"),
                                        "confidence": conf, "confidence_drop": q.confidence - conf}
            else:
                out["outputs"][name] = _psi_scores(self._psi[f"out:{name}"], w.total(f"out:{name}"))
        return out

    def scores(self) -> dict[str, Any]:
        """Scores over the window now (NaN where nothing was seen), with the alarm state."""
        with self._lock:
            s = self._compute()
            s.update(alarm=not self._armed, alarms=self.alarms, version=self.version)
            return s

    def headline(self) -> dict[str, float]:
        """Worst score of each kind over the window (for metrics): psi, js, confidence, samples, alarm."""
        s = self.scores()
        values = [*s["inputs"].values(), *s["outputs"].values()]
        return {"psi": _worst(v.get("psi") for v in values), "js": _worst(v.get("js") for v in values),
                "confidence": _least(v.get("confidence") for v in values),
                "samples": float(s["samples"]), "alarm": float(s["alarm"])}

    def _crossed(self, s: dict[str, Any], scale: float) -> list[str]:
        cfg, crossed = self.settings, []
        for group in ("inputs", "outputs"):
            for name, v in s[group].items():
                if "psi" in v and v["psi"] > cfg.psi_threshold * scale:
                    crossed.append(f"{group[:-1]} {name}: psi {v['psi']:.3f} > "
                                   f"{cfg.psi_threshold * scale:.3g}")
                if "js" in v and v["js"] > cfg.js_threshold * scale:
                    crossed.append(f"output {name}: js {v['js']:.3f} > {cfg.js_threshold * scale:.3g}")
                if v.get("confidence_drop", 0.0) > cfg.confidence_drop * scale:
                    crossed.append(f"output {name}: confidence {v['confidence']:.3f} dropped by "
                                   f"{v['confidence_drop']:.3f} > {cfg.confidence_drop * scale:.3g}")
        return crossed

    def _judge(self) -> DriftAlarm | None:
        if self.window.count < self.settings.min_samples:
            return None
        s = self._compute()
        if not self._armed:
            if not self._crossed(s, REARM_FRACTION):
                self._armed = True
            return None
        crossed = self._crossed(s, 1.0)
        now = self.clock()
        if not crossed or now - self._last_alarm < self.settings.event_interval_s:
            return None
        self._armed, self._last_alarm = False, now
        self.alarms += 1
        return DriftAlarm(self.model, self.version, tuple(crossed), s)


def _as_rows(profile: ValueProfile, a: np.ndarray) -> np.ndarray:
    """Staged tensors as rows x features ("channel" tensors were reduced when staged)."""
    return a if profile.layout == "channel" else profile.rows(a)


def _stager(profile: ValueProfile | ClassProfile, copy: bool) -> Callable[[np.ndarray], np.ndarray]:
    """What the request path keeps of one tensor: a copy, the tensor itself, or an image's subsample."""
    if isinstance(profile, ValueProfile) and profile.layout == "channel":
        return lambda a: np.array(profile.rows(a), np.float32)
    return np.array if copy else np.asarray


def _psi_scores(ref: PsiReference, counts: np.ndarray) -> dict[str, float]:
    if not counts.sum():
        return {"psi": float("nan"), "psi_max": float("nan")}
    per = ref.psi(counts)
    return {"psi": float(per.mean()), "psi_max": float(per.max())}


def _worst(values: Any) -> float:
    xs = [x for x in values if x is not None and x == x]
    return max(xs) if xs else float("nan")


def _least(values: Any) -> float:
    xs = [x for x in values if x is not None and x == x]
    return min(xs) if xs else float("nan")
