"""Per model version inference statistics (Triton's statistics extension) and CPU cost per inference.

The engine records each finished request's :class:`~edgert.metrics.timing.RequestTiming` here
(:meth:`InferenceStats.record`) and each batch its batcher ran (:meth:`InferenceStats.record_batch`);
:meth:`InferenceStats.model_stats` renders the ``$stats_model_response`` document of Triton's
statistics extension, which ``tritonclient``'s ``get_inference_statistics`` reads unchanged.

Semantics follow the extension: ``success``/``fail`` count requests and their time in the server;
``queue`` and the ``compute_*`` stages count successful requests (a batched request reports its
batch's run); ``inference_count`` counts rows and ``execution_count`` session runs, neither
including cache hits; ``batch_stats`` has one entry per batch size run. Statistics cover every
version served since the daemon started, until the model is removed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from edgert.errors import UnknownModelError
from edgert.metrics import Metrics
from edgert.metrics.timing import CPU_SAMPLE_EVERY, RequestTiming

__all__ = ["InferenceStats", "VersionStats", "register_cost_metrics"]


class VersionStats:
    """Cumulative counters of one model version (guarded by the owning InferenceStats' lock)."""

    __slots__ = (
        "batches",
        "cache_n",
        "cache_ns",
        "cpu_infer_ns",
        "cpu_input_ns",
        "cpu_output_ns",
        "cpu_requests",
        "execution_count",
        "fail_n",
        "fail_ns",
        "infer_ns",
        "inference_count",
        "input_ns",
        "last_ns",
        "output_ns",
        "queue_ns",
        "stage_n",
        "success_n",
        "success_ns",
    )

    def __init__(self) -> None:
        self.success_n = self.success_ns = self.fail_n = self.fail_ns = 0
        self.stage_n = self.queue_ns = self.input_ns = self.infer_ns = self.output_ns = 0
        self.cache_n = self.cache_ns = 0
        self.inference_count = self.execution_count = 0
        self.last_ns = 0  # monotonic ns of the last request (0: none yet)
        #: batch size -> [runs, input ns, infer ns, output ns]
        self.batches: dict[int, list[int]] = {}
        self.cpu_requests = self.cpu_input_ns = self.cpu_infer_ns = self.cpu_output_ns = 0

    def add_batch(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """Count one session run of ``rows`` rows."""
        self.execution_count += 1
        entry = self.batches.get(rows)
        if entry is None:
            self.batches[rows] = [1, input_ns, infer_ns, output_ns]
        else:
            entry[0] += 1
            entry[1] += input_ns
            entry[2] += infer_ns
            entry[3] += output_ns

    def doc(self, name: str, version: str) -> dict[str, Any]:
        """This version's ``$model_stat`` object."""
        n = self.stage_n
        return {
            "name": name,
            "version": version,
            "last_inference": _wall_ms(self.last_ns),
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                "success": _duration(self.success_n, self.success_ns),
                "fail": _duration(self.fail_n, self.fail_ns),
                "queue": _duration(self.success_n, self.queue_ns),
                "compute_input": _duration(n, self.input_ns),
                "compute_infer": _duration(n, self.infer_ns),
                "compute_output": _duration(n, self.output_ns),
                "cache_hit": _duration(self.cache_n, self.cache_ns),
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": _duration(e[0], e[1]),
                    "compute_infer": _duration(e[0], e[2]),
                    "compute_output": _duration(e[0], e[3]),
                }
                for size, e in sorted(self.batches.items())
            ],
        }

    def cpu_per_inference(self) -> dict[str, float]:
        """Mean CPU seconds per request by stage, over the sampled requests ({} before any sample)."""
        if not self.cpu_requests:
            return {}
        per = 1e-9 / self.cpu_requests
        return {
            "input": self.cpu_input_ns * per,
            "infer": self.cpu_infer_ns * per,
            "output": self.cpu_output_ns * per,
        }


def _wall_ms(monotonic_ns: int) -> int:
    """Milliseconds since the epoch of a monotonic time (0 stays 0: never)."""
    if not monotonic_ns:
        return 0
    return (time.time_ns() - time.monotonic_ns() + monotonic_ns) // 1_000_000


def _duration(count: int, ns: int) -> dict[str, int]:
    return {"count": count, "ns": ns}


class InferenceStats:
    """Statistics of every served model version, recorded by the engine on the request path."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[tuple[str, str], VersionStats] = {}

    def _get(self, name: str, version: str) -> VersionStats:
        stats = self._versions.get((name, version))
        if stats is None:
            stats = self._versions[(name, version)] = VersionStats()
        return stats

    # -- recording (request path) ------------------------------------------------------------------
    def record(self, t: RequestTiming, ok: bool) -> None:
        """Count one finished request of ``t.model`` version ``t.version``."""
        end = t.finished_ns or time.monotonic_ns()
        total = end - t.received_ns
        with self._lock:
            s = self._get(t.model, t.version)
            s.last_ns = end
            if not ok:
                s.fail_n += 1
                s.fail_ns += total
                return
            s.success_n += 1
            s.success_ns += total
            s.queue_ns += t.queue_ns
            if t.cached:
                s.cache_n += 1
                s.cache_ns += t.output_ns
                return
            s.stage_n += 1
            input_ns = t.decode_ns + t.input_ns
            s.input_ns += input_ns
            s.infer_ns += t.infer_ns
            s.output_ns += t.output_ns
            s.inference_count += t.rows
            if not t.batched and t.infer_ns:
                s.add_batch(t.batch_size, input_ns, t.infer_ns, t.output_ns)
            if t.cpu:
                s.cpu_requests += 1
                s.cpu_input_ns += t.cpu_input_ns
                s.cpu_infer_ns += t.cpu_infer_ns
                s.cpu_output_ns += t.cpu_output_ns

    def record_rejected(self, name: str, version: str) -> None:
        """Count a request refused at admission (overloaded, draining) as a failure taking no time."""
        with self._lock:
            s = self._get(name, version)
            s.fail_n += 1
            s.last_ns = time.monotonic_ns()

    def record_batch(self, name: str, version: str, rows: int, input_ns: int, infer_ns: int,
                     output_ns: int) -> None:
        """Count one batch of ``rows`` rows run by ``name``'s batcher."""
        with self._lock:
            self._get(name, version).add_batch(rows, input_ns, infer_ns, output_ns)

    def remove(self, name: str) -> None:
        """Forget every version of ``name`` (it no longer serves)."""
        with self._lock:
            for key in [k for k in self._versions if k[0] == name]:
                del self._versions[key]

    # -- views ---------------------------------------------------------------------------------------
    def model_stats(
        self,
        served: Iterable[tuple[str, str]],
        name: str | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """Triton's ``$stats_model_response`` for ``name`` (all models when None) and ``version``.

        ``served`` lists the (name, version) pairs serving now: they appear even before their first
        request. Versions served earlier that still have statistics appear too. Raises
        UnknownModelError (404) for a model or version with neither.
        """
        served = list(served)
        with self._lock:
            keys = set(self._versions) | set(served)
            if name is not None:
                keys = {k for k in keys if k[0] == name}
                if not keys:
                    raise UnknownModelError(
                        f"no statistics for model {name!r}: it is not served",
                        hint="GET /v2/models/stats lists every served model",
                    )
                if version is not None:
                    versions = sorted(k[1] for k in keys)
                    keys = {k for k in keys if k[1] == version}
                    if not keys:
                        raise UnknownModelError(
                            f"no statistics for model {name!r} version {version!r}; "
                            f"versions with statistics: {versions}",
                            hint=f"GET /v2/models/{name}/stats reports every version",
                        )
            docs = [self._versions.get(k, VersionStats()).doc(*k) for k in sorted(keys)]
        return {"model_stats": docs}

    def cpu_per_inference(self) -> dict[str, dict[str, float]]:
        """Per model (all versions together): mean CPU seconds per request by stage, and ``samples``."""
        with self._lock:
            merged: dict[str, list[int]] = {}
            for (name, _), s in self._versions.items():
                acc = merged.setdefault(name, [0, 0, 0, 0])
                acc[0] += s.cpu_requests
                acc[1] += s.cpu_input_ns
                acc[2] += s.cpu_infer_ns
                acc[3] += s.cpu_output_ns
        out: dict[str, dict[str, float]] = {}
        for name, (n, i, r, o) in merged.items():
            if n:
                out[name] = {"input": i / n / 1e9, "infer": r / n / 1e9, "output": o / n / 1e9,
                             "samples": float(n)}
        return out


def register_cost_metrics(metrics: Metrics, stats: InferenceStats) -> None:
    """Export the sampled CPU cost per inference of every model as Prometheus gauges (and telemetry)."""

    def reader(key: str) -> Callable[[], dict[str, float]]:
        def read() -> dict[str, float]:
            cost = stats.cpu_per_inference()
            if key == "total":
                return {m: c["input"] + c["infer"] + c["output"] for m, c in cost.items()}
            return {m: c[key] for m, c in cost.items()}

        return read

    every = f"sampled on one request in {CPU_SAMPLE_EVERY}"
    metrics.add_gauge_source("inference_cpu_seconds", f"Mean CPU seconds per request, all stages ({every}).",
                             reader("total"))
    for stage, what in (("input", "decoding and validating inputs"), ("infer", "the session run"),
                        ("output", "splitting and selecting outputs")):
        metrics.add_gauge_source(f"inference_cpu_{stage}_seconds",
                                 f"Mean CPU seconds per request spent {what} ({every}).", reader(stage))
    metrics.add_gauge_source("inference_cpu_samples", "Requests whose CPU time was measured.",
                             reader("samples"))
