"""The metrics registry: per-model counters, histograms and sketches; Prometheus and telemetry views.

One lock guards everything: each observation is a handful of integer updates, so a single
uncontended lock costs less than the bookkeeping of finer-grained ones. Gauges that the engine
already knows (queue depth, in-flight) are pulled through *gauge sources* at render time instead of
being pushed on every request.

Error ``reason`` values become label values: callers must pass short fixed tokens ("input",
"overloaded", "backend", ...), never free text, so label cardinality stays bounded.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgert.metrics import process
from edgert.metrics.sketch import QuantileSketch
from edgert.metrics.streams import StreamStats

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "SUMMARY_QUANTILES", "Metrics"]

#: Latency histogram bucket upper bounds in seconds (digits runs in ~20 us, MobileNetV2 in ~2 ms).
LATENCY_BUCKETS: tuple[float, ...] = (
    25e-6,
    50e-6,
    100e-6,
    250e-6,
    500e-6,
    1e-3,
    2.5e-3,
    5e-3,
    10e-3,
    25e-3,
    50e-3,
    100e-3,
    250e-3,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Batch-size histogram bucket upper bounds (rows per session run).
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SUMMARY_QUANTILES: tuple[float, ...] = (0.5, 0.9, 0.99)
_PREFIX = "edgert_"


class _Histogram:
    """Cumulative-on-render histogram with fixed upper bounds (the last bucket is +Inf)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, x: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, x)] += n
        self.count += n
        self.sum += x * n

    def copy(self) -> _Histogram:
        out = _Histogram(self.bounds)
        out.counts = list(self.counts)
        out.count = self.count
        out.sum = self.sum
        return out


@dataclass
class _ModelStats:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latency: _Histogram = field(default_factory=lambda: _Histogram(LATENCY_BUCKETS))
    sketch: QuantileSketch = field(default_factory=QuantileSketch)
    batches: _Histogram = field(default_factory=lambda: _Histogram(BATCH_BUCKETS))
    cache_hits: int = 0
    cache_misses: int = 0
    cascade_rows: int = 0
    cascade_escalated: int = 0
    version: str = ""
    provider: str = ""
    fmt: str = ""
    kind: str = "model"
    load_seconds: float | None = None

    def copy(self) -> _ModelStats:
        return _ModelStats(
            self.requests,
            dict(self.errors),
            self.latency.copy(),
            self.sketch.copy(),
            self.batches.copy(),
            self.cache_hits,
            self.cache_misses,
            self.cascade_rows,
            self.cascade_escalated,
            self.version,
            self.provider,
            self.fmt,
            self.kind,
            self.load_seconds,
        )


@dataclass(frozen=True)
class _GaugeSource:
    name: str
    help: str
    read: Callable[[], Mapping[str, float]]


class Metrics:
    """Thread-safe metrics registry for the engine; renders Prometheus text and telemetry snapshots."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._models: dict[str, _ModelStats] = {}
        self._window: dict[str, _ModelStats] = {}
        self._window_start = clock()
        self._sources: list[_GaugeSource] = []
        self._stages: dict[str, dict[str, _Histogram]] = {}  # pipeline -> stage -> seconds

    # -- recording (hot path: keep these tiny) -------------------------------------------------------
    def _stats(self, model: str) -> _ModelStats:
        stats = self._models.get(model)
        if stats is None:
            stats = self._models[model] = _ModelStats()
        return stats

    def observe_request(self, model: str, seconds: float, *, error: str | None = None) -> None:
        """Record one finished request of ``model`` that took ``seconds``; ``error`` is a short reason."""
        with self._lock:
            stats = self._stats(model)
            stats.requests += 1
            if error is None:
                stats.latency.observe(seconds)
                stats.sketch.add(seconds)
            else:
                stats.errors[error] = stats.errors.get(error, 0) + 1

    def observe_batch(self, model: str, rows: int) -> None:
        """Record one session run of ``rows`` rows."""
        with self._lock:
            self._stats(model).batches.observe(rows)

    def observe_cache(self, model: str, hit: bool) -> None:
        """Record a result-cache lookup."""
        with self._lock:
            stats = self._stats(model)
            if hit:
                stats.cache_hits += 1
            else:
                stats.cache_misses += 1

    def observe_cascade(self, name: str, rows: int, escalated: int) -> None:
        """Record a cascade request of ``rows`` rows of which ``escalated`` went to the large model."""
        with self._lock:
            stats = self._stats(name)
            stats.cascade_rows += rows
            stats.cascade_escalated += escalated

    def observe_stage(self, pipeline: str, stage: str, seconds: float) -> None:
        """Record one run of a pipeline's ``stage`` that took ``seconds`` (stage names come from config)."""
        with self._lock:
            stages = self._stages.setdefault(pipeline, {})
            hist = stages.get(stage)
            if hist is None:
                hist = stages[stage] = _Histogram(LATENCY_BUCKETS)
            hist.observe(seconds)

    def stage_stats(self, pipeline: str) -> dict[str, dict[str, float]]:
        """Per-stage ``count`` and ``seconds`` (total) of ``pipeline`` since start."""
        with self._lock:
            stages = self._stages.get(pipeline, {})
            return {n: {"count": h.count, "seconds": h.sum} for n, h in stages.items()}

    def set_model_info(
        self,
        model: str,
        *,
        version: str,
        provider: str,
        fmt: str = "",
        load_seconds: float | None = None,
        kind: str = "model",
    ) -> None:
        """Record which version and effective provider serve ``model`` and how long it took to load."""
        with self._lock:
            stats = self._stats(model)
            stats.version, stats.provider, stats.fmt, stats.kind = version, provider, fmt, kind
            stats.load_seconds = load_seconds

    def remove_model(self, model: str) -> None:
        """Forget ``model`` (after it is removed from serving)."""
        with self._lock:
            self._models.pop(model, None)
            self._window.pop(model, None)
            self._stages.pop(model, None)

    def add_gauge_source(self, name: str, help: str, read: Callable[[], Mapping[str, float]]) -> None:
        """Register a per-model gauge ``edgert_<name>`` whose values ``read()`` returns at render time."""
        with self._lock:
            self._sources = [s for s in self._sources if s.name != name]
            self._sources.append(_GaugeSource(name, help, read))

    @property
    def streams(self) -> StreamStats:
        """Stream sessions by model (open, dropped items, lag); published as gauges from first use."""
        stats: StreamStats | None = self.__dict__.get("_streams")
        if stats is None:
            stats = self.__dict__["_streams"] = StreamStats()
            stats.attach(self)
        return stats

    def models(self) -> list[str]:
        """Return the names of models with recorded stats."""
        with self._lock:
            return sorted(self._models)

    def stats_copy(self, model: str) -> dict[str, Any]:
        """Return cumulative counters of one model (for tests and the CLI)."""
        with self._lock:
            stats = self._models.get(model)
            return _summarise(stats.copy() if stats else _ModelStats(), None)

    # -- views -------------------------------------------------------------------------------------
    def snapshot(self, reset_window: bool = False) -> dict[str, Any]:
        """Per-model stats for telemetry: cumulative, or since the last reset when ``reset_window``."""
        now = self._clock()
        with self._lock:
            current = {name: stats.copy() for name, stats in self._models.items()}
            baselines = dict(self._window) if reset_window else {}
            since = self._window_start if reset_window else None
            if reset_window:
                self._window = {name: stats.copy() for name, stats in current.items()}
                self._window_start = now
        models = {name: _summarise(stats, baselines.get(name)) for name, stats in current.items()}
        doc: dict[str, Any] = {
            "models": models,
            "process": {"rss_bytes": process.resident_memory_bytes(), "cpu_seconds": process.cpu_seconds()},
        }
        if since is not None:
            doc["window_seconds"] = now - since
        for name in models:
            if current[name].kind == "pipeline":
                models[name]["stages"] = self.stage_stats(name)
        for source in self._read_sources():
            for model, value in source[2].items():
                if model in models:
                    models[model][source[0]] = value
        return doc

    def _read_sources(self) -> list[tuple[str, str, Mapping[str, float]]]:
        with self._lock:
            sources = list(self._sources)
        # Read outside our lock: a source takes the engine's locks, which may call back into us.
        return [(s.name, s.help, s.read()) for s in sources]

    def render_prometheus(self) -> bytes:
        """Render all metrics in the Prometheus text exposition format 0.0.4."""
        with self._lock:
            models = {name: stats.copy() for name, stats in sorted(self._models.items())}
            stages = {p: {n: h.copy() for n, h in sorted(s.items())} for p, s in sorted(self._stages.items())}
        out: list[str] = []
        _render_counters(out, models)
        _render_latency(out, models)
        _render_batches(out, models)
        _render_info(out, models)
        _render_stages(out, stages)
        for name, help_text, values in self._read_sources():
            _family(out, name, "gauge", help_text)
            for model, value in sorted(values.items()):
                out.append(f"{_PREFIX}{name}{_labels(model=model)} {_num(value)}")
        _render_process(out)
        return ("\n".join(out) + "\n").encode()


# -- snapshot helpers ---------------------------------------------------------------------------------
def _summarise(stats: _ModelStats, base: _ModelStats | None) -> dict[str, Any]:
    base = base or _ModelStats()
    sketch = stats.sketch.subtract(base.sketch) if base.sketch.count else stats.sketch
    errors = {k: v - base.errors.get(k, 0) for k, v in stats.errors.items() if v - base.errors.get(k, 0)}
    hits, misses = stats.cache_hits - base.cache_hits, stats.cache_misses - base.cache_misses
    rows, escalated = stats.cascade_rows - base.cascade_rows, stats.cascade_escalated - base.cascade_escalated
    batch_counts = [a - b for a, b in zip(stats.batches.counts, base.batches.counts, strict=False)]
    batch_runs = stats.batches.count - base.batches.count
    doc: dict[str, Any] = {
        "kind": stats.kind,
        "version": stats.version,
        "provider": stats.provider,
        "requests": stats.requests - base.requests,
        "errors": errors,
        "latency_s": {f"p{round(q * 100)}": _finite(sketch.quantile(q)) for q in SUMMARY_QUANTILES},
        "latency_sketch": sketch.to_dict(),
        "batch_sizes": {
            _num(b): c for b, c in zip((*BATCH_BUCKETS, math.inf), batch_counts, strict=False) if c
        },
        "mean_batch_size": (stats.batches.sum - base.batches.sum) / batch_runs if batch_runs else None,
        "cache": {
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / (hits + misses) if hits + misses else None,
        },
        "load_seconds": stats.load_seconds,
    }
    if stats.kind == "cascade":
        doc["cascade"] = {
            "rows": rows,
            "escalated": escalated,
            "escalation_rate": escalated / rows if rows else None,
        }
    return doc


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


# -- Prometheus text helpers --------------------------------------------------------------------------
def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels.items()) + "}"


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _family(out: list[str], name: str, kind: str, help_text: str) -> None:
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    out.append(f"# HELP {_PREFIX}{name} {help_text}")
    out.append(f"# TYPE {_PREFIX}{name} {kind}")


def _render_counters(out: list[str], models: dict[str, _ModelStats]) -> None:
    _family(out, "requests_total", "counter", "Inference requests finished, including errors.")
    for name, s in models.items():
        out.append(f"{_PREFIX}requests_total{_labels(model=name)} {s.requests}")
    _family(out, "request_errors_total", "counter", "Failed inference requests by reason.")
    for name, s in models.items():
        for reason, n in sorted(s.errors.items()):
            out.append(f"{_PREFIX}request_errors_total{_labels(model=name, reason=reason)} {n}")
    _family(out, "cache_hits_total", "counter", "Result cache hits.")
    for name, s in models.items():
        out.append(f"{_PREFIX}cache_hits_total{_labels(model=name)} {s.cache_hits}")
    _family(out, "cache_misses_total", "counter", "Result cache misses.")
    for name, s in models.items():
        out.append(f"{_PREFIX}cache_misses_total{_labels(model=name)} {s.cache_misses}")
    cascades = {n: s for n, s in models.items() if s.kind == "cascade"}
    _family(out, "cascade_rows_total", "counter", "Rows served by a cascade.")
    for name, s in cascades.items():
        out.append(f"{_PREFIX}cascade_rows_total{_labels(model=name)} {s.cascade_rows}")
    _family(out, "cascade_escalations_total", "counter", "Cascade rows escalated to the large model.")
    for name, s in cascades.items():
        out.append(f"{_PREFIX}cascade_escalations_total{_labels(model=name)} {s.cascade_escalated}")


def _render_hist(out: list[str], name: str, model: str, hist: _Histogram) -> None:
    cumulative = 0
    for bound, count in zip((*hist.bounds, math.inf), hist.counts, strict=False):
        cumulative += count
        out.append(f"{_PREFIX}{name}_bucket{_labels(model=model, le=_num(bound))} {cumulative}")
    out.append(f"{_PREFIX}{name}_sum{_labels(model=model)} {_num(hist.sum)}")
    out.append(f"{_PREFIX}{name}_count{_labels(model=model)} {hist.count}")


def _render_latency(out: list[str], models: dict[str, _ModelStats]) -> None:
    _family(out, "request_latency_seconds", "histogram", "Latency of successful requests.")
    for name, s in models.items():
        _render_hist(out, "request_latency_seconds", name, s.latency)
    _family(
        out,
        "request_latency_quantile_seconds",
        "summary",
        "Latency quantiles of successful requests since start (DDSketch, 1% relative error).",
    )
    for name, s in models.items():
        for q in SUMMARY_QUANTILES:
            value = _num(s.sketch.quantile(q))
            out.append(
                f"{_PREFIX}request_latency_quantile_seconds{_labels(model=name, quantile=_num(q))} {value}"
            )
        out.append(f"{_PREFIX}request_latency_quantile_seconds_sum{_labels(model=name)} {_num(s.sketch.sum)}")
        out.append(f"{_PREFIX}request_latency_quantile_seconds_count{_labels(model=name)} {s.sketch.count}")


def _render_batches(out: list[str], models: dict[str, _ModelStats]) -> None:
    _family(out, "batch_size", "histogram", "Rows per session run.")
    for name, s in models.items():
        if s.kind == "model":
            _render_hist(out, "batch_size", name, s.batches)


def _render_stages(out: list[str], stages: dict[str, dict[str, _Histogram]]) -> None:
    _family(out, "pipeline_stage_seconds", "histogram", "Time spent in each pipeline stage (model stages "
            "include their queueing).")
    for pipeline, hists in stages.items():
        for stage, hist in hists.items():
            cumulative = 0
            labels = {"model": pipeline, "stage": stage}
            for bound, count in zip((*hist.bounds, math.inf), hist.counts, strict=False):
                cumulative += count
                bucket = _labels(**labels, le=_num(bound))
                out.append(f"{_PREFIX}pipeline_stage_seconds_bucket{bucket} {cumulative}")
            out.append(f"{_PREFIX}pipeline_stage_seconds_sum{_labels(**labels)} {_num(hist.sum)}")
            out.append(f"{_PREFIX}pipeline_stage_seconds_count{_labels(**labels)} {hist.count}")


def _render_info(out: list[str], models: dict[str, _ModelStats]) -> None:
    _family(out, "model_info", "gauge", "Served model version and effective provider (value is always 1).")
    for name, s in models.items():
        labels = _labels(model=name, version=s.version, provider=s.provider, format=s.fmt, kind=s.kind)
        out.append(f"{_PREFIX}model_info{labels} 1")
    _family(out, "model_load_seconds", "gauge", "Seconds taken to create the model's session.")
    for name, s in models.items():
        if s.load_seconds is not None:
            out.append(f"{_PREFIX}model_load_seconds{_labels(model=name)} {_num(s.load_seconds)}")


def _render_process(out: list[str]) -> None:
    rss = process.resident_memory_bytes()
    out.append("# HELP process_resident_memory_bytes Resident memory size in bytes.")
    out.append("# TYPE process_resident_memory_bytes gauge")
    if rss is not None:
        out.append(f"process_resident_memory_bytes {rss}")
    out.append("# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.")
    out.append("# TYPE process_cpu_seconds_total counter")
    out.append(f"process_cpu_seconds_total {_num(process.cpu_seconds())}")
