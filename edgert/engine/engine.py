"""The serving engine: validation, admission control, result cache, dynamic batching, cascades, hot swap.

Request path: admit (in-flight and queue limits) -> validate -> cache lookup -> batcher, inline run
or thread pool -> cache store -> metrics. Execution placement is chosen per model from its measured
warm-up latency (see :data:`edgert.engine.served.INLINE_THRESHOLD_S`): batched models always run on
their batcher's worker thread; unbatched tiny models run inline on the caller's thread; unbatched
slow models run on the engine's thread pool so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from edgert.engine.batching import batch_rows
from edgert.engine.cache import cache_key
from edgert.engine.cascade_run import cascade_info, check_members, run_cascade_async, run_cascade_sync
from edgert.engine.config import CascadeConfig, InferResult, ModelConfig, ModelInfo, ServableModel
from edgert.engine.lifecycle import DRAIN_POLL_S, SWAP_DRAIN_TIMEOUT_S, EngineLifecycle
from edgert.engine.pipeline import PipelineSet
from edgert.engine.pipeline_config import PipelineConfig
from edgert.engine.served import Progress, Served, prepare
from edgert.engine.stats import InferenceStats, register_cost_metrics
from edgert.errors import (
    BackendError,
    ConfigError,
    EdgertError,
    InputError,
    OverloadedError,
    UnknownModelError,
)
from edgert.metrics import Metrics
from edgert.metrics.timing import RequestTiming

__all__ = ["DRAIN_POLL_S", "SWAP_DRAIN_TIMEOUT_S", "Engine", "UnknownModelError"]

log = logging.getLogger("edgert.engine")

#: Bounds of the Retry-After estimate given with OverloadedError.
RETRY_AFTER_MIN_S = 0.01
RETRY_AFTER_MAX_S = 5.0
#: Threads for unbatched slow models (onnxruntime releases the GIL, so these run in parallel).
POOL_THREADS = max(2, os.cpu_count() or 2)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        return "input"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, BackendError):
        return "backend"
    return "error" if isinstance(exc, EdgertError) else "internal"


class _Admitted:
    """One admitted request: on exit, record a failure, free its slot, then record its latency.

    Shared by :meth:`Engine.infer` and :meth:`Engine.infer_sync`. A class rather than
    ``@contextmanager`` because this is on every request's path and a generator costs more.
    """

    __slots__ = ("engine", "name", "served", "start", "timing")

    def __init__(
        self, engine: Engine, name: str, version: str | None, start: float, t: RequestTiming
    ) -> None:
        self.engine, self.name, self.start, self.timing = engine, name, start, t
        self.served = engine._admit(name, version)  # raises before anything needs undoing
        t.admitted_ns, t.model, t.version = time.monotonic_ns(), name, self.served.model.version

    def __enter__(self) -> Served:
        return self.served

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if exc is not None:
                self.engine.record_failure(self.name, self.start, exc)
        finally:
            self.engine._release(self.served)
        t = self.timing
        t.finished_ns = time.monotonic_ns()
        if not isinstance(exc, asyncio.CancelledError):
            self.engine.stats.record(t, exc is None)
        if exc is None:
            self.engine.metrics.observe_request(self.name, time.perf_counter() - self.start)


class Engine(EngineLifecycle):
    """Serves loaded models and cascades to async and threaded callers; see the module docstring."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._served: dict[str, Served] = {}
        self._cascades: dict[str, CascadeConfig] = {}
        self._draining = False
        self._pool: ThreadPoolExecutor | None = None
        self.pipelines = PipelineSet(self)  # pipelines (engine/pipeline.py): one model name over stages
        #: Triton-style statistics per model version, and sampled CPU cost per inference.
        self.stats = InferenceStats()
        register_cost_metrics(metrics, self.stats)
        metrics.add_gauge_source("queue_depth", "Requests waiting in the batch queue.", self._queue_depths)
        metrics.add_gauge_source("in_flight", "Admitted requests not yet finished.", self._in_flight)

    # -- registry ----------------------------------------------------------------------------------
    def add_model(self, model: ServableModel, config: ModelConfig, *, warmup: int = 3) -> None:
        """Warm up ``model`` and serve it under ``config.name``."""
        with self._lock:
            if config.name in self._served or config.name in self._cascades or config.name in self.pipelines:
                raise ConfigError(f"model {config.name!r} is already served", hint="use swap() to replace it")
        served = self._prepare(model, config, warmup)
        with self._lock:
            self._served[config.name] = served
        self._publish_info(served)

    def add_cascade(self, config: CascadeConfig) -> None:
        """Serve a cascade of two already-added models under ``config.name``."""
        with self._lock:
            if config.name in self._served or config.name in self._cascades or config.name in self.pipelines:
                raise ConfigError(f"cascade {config.name!r}: the name is already served")
            missing = [m for m in (config.small, config.large) if m not in self._served]
            if missing:
                raise ConfigError(
                    f"cascade {config.name!r}: unknown member model(s) {missing}",
                    hint="add the member models before the cascade",
                )
            small, large = self._served[config.small].model, self._served[config.large].model
        check_members(config, small, large)
        with self._lock:
            self._cascades[config.name] = config
        self.metrics.set_model_info(
            config.name,
            version=f"{small.version}+{large.version}",
            provider=f"cascade({small.provider},{large.provider})",
            kind="cascade",
        )

    def add_pipeline(self, config: PipelineConfig) -> None:
        """Serve a pipeline over served models/cascades, its stage chain checked; raises ConfigError."""
        self.pipelines.add(config)

    def remove(self, name: str, *, keep_stats: bool = False) -> None:
        """Stop serving ``name``; queued requests finish, running ones finish before the model closes.

        ``keep_stats`` keeps its metrics and statistics (an unload for the memory budget: it loads again).
        """
        if self.pipelines.discard(name):
            self.metrics.remove_model(name)
            return
        self.pipelines.check_unused(name)
        with self._lock:
            if name in self._cascades:
                del self._cascades[name]
                served = None
            else:
                users = [c.name for c in self._cascades.values() if name in (c.small, c.large)]
                if users:
                    raise ConfigError(
                        f"model {name!r} is used by cascade(s) {users}", hint="remove them first"
                    )
                served = self._served.pop(name, None)
                if served is None:
                    raise self._unknown(name)
        if served is not None:
            self._retire(served)
        if not keep_stats:
            self.metrics.remove_model(name)
            self.stats.remove(name)

    def models(self) -> list[ModelInfo]:
        """Describe every served model and cascade."""
        with self._lock:
            names = sorted([*self._served, *self._cascades, *self.pipelines.names()])
        return [self.get(n) for n in names]

    def get(self, name: str, version: str | None = None) -> ModelInfo:
        """Describe ``name`` (optionally checking ``version``); raises UnknownModelError."""
        pipeline = self.pipelines.get(name)
        if pipeline is not None:
            return self.pipelines.info(pipeline, version, ready=not self._draining)
        with self._lock:
            cascade = self._cascades.get(name)
            served = self._served.get(cascade.small if cascade else name)
            large = self._served.get(cascade.large) if cascade else None
        if served is None:
            raise self._unknown(name)
        if cascade is not None and large is not None:
            info = cascade_info(name, served.model, large.model, ready=not self._draining)
        else:
            info = ModelInfo(
                name=name,
                versions=(served.model.version,),
                inputs=tuple(served.model.inputs),
                outputs=tuple(served.model.outputs),
                provider=served.model.provider,
                format=served.model.format,
                ready=not self._draining and not served.retired,
                max_batch_size=served.max_batch,
            )
        if version is not None and version not in info.versions:
            raise UnknownModelError(
                f"model {name!r} has no version {version!r}; serving {list(info.versions)}",
                hint="omit the version to use the served one",
            )
        return info

    def progress(self) -> dict[str, Progress]:
        """Per-model supervision view: runs in progress and the monotonic time of the last progress."""
        with self._lock:
            return {n: Progress(s.running, s.last_progress) for n, s in self._served.items()}

    def stalled(self, now: float, limit_s: float) -> list[str]:
        """Names of models with a run going for more than ``limit_s`` without progress (``now`` monotonic)."""
        return sorted(n for n, p in self.progress().items() if p.stalled(now, limit_s))

    # -- inference ---------------------------------------------------------------------------------
    async def infer(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        timing: RequestTiming | None = None,
    ) -> InferResult:
        """Run one request (validated, admitted, cached, batched); raises InputError/OverloadedError/...

        ``timing`` (from a transport) is filled with the request's stages; see edgert.metrics.timing.
        """
        start = time.perf_counter()
        cascade = self._cascades.get(name)
        if cascade is not None:
            return await run_cascade_async(self, cascade, inputs, version, outputs, start)
        pipeline = self.pipelines.get(name)
        if pipeline is not None:
            return await self.pipelines.infer(pipeline, inputs, version, outputs, start)
        t = timing or RequestTiming()
        with _Admitted(self, name, version, start, t) as served:
            validated, key, hit = self._before(served, inputs, outputs, t)
            if hit is not None:
                out = hit
            elif served.batcher is not None:
                out = await served.batcher.submit_async(validated, t.rows, t)
            elif served.inline:
                out = self._run(served, validated, t)
            else:
                loop = asyncio.get_running_loop()
                out = await loop.run_in_executor(self._executor(), self._run, served, validated, t)
            return self._after(served, out, outputs, key, t, cached=hit is not None)

    def infer_sync(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        timing: RequestTiming | None = None,
    ) -> InferResult:
        """Blocking :meth:`infer` for threads (never call it from a running event loop: it blocks)."""
        start = time.perf_counter()
        cascade = self._cascades.get(name)
        if cascade is not None:
            return run_cascade_sync(self, cascade, inputs, version, outputs, start)
        pipeline = self.pipelines.get(name)
        if pipeline is not None:
            return self.pipelines.infer_sync(pipeline, inputs, version, outputs, start)
        t = timing or RequestTiming()
        with _Admitted(self, name, version, start, t) as served:
            validated, key, hit = self._before(served, inputs, outputs, t)
            if hit is not None:
                out = hit
            elif served.batcher is not None:
                out = served.batcher.submit_sync(validated, t.rows, t)
            else:
                out = self._run(served, validated, t)
            return self._after(served, out, outputs, key, t, cached=hit is not None)

    def _admit(self, name: str, version: str | None) -> Served:
        with self._lock:
            served = self._served.get(name)
            if served is None:
                raise self._unknown(name)
            if version is not None and version != served.model.version:
                raise UnknownModelError(
                    f"model {name!r} has no version {version!r}; serving {served.model.version!r}",
                    hint="omit the version to use the served one",
                )
            if self._draining:
                error = OverloadedError("the engine is shutting down", retry_after=RETRY_AFTER_MAX_S)
            elif served.active >= served.config.max_in_flight:
                error = self._overloaded(served, f"{served.active} requests in flight")
            elif served.batcher is not None and served.batcher.depth >= served.config.max_queue:
                error = self._overloaded(served, f"{served.batcher.depth} requests queued")
            else:
                served.active += 1
                return served
        self.metrics.observe_request(name, 0.0, error="overloaded")
        self.stats.record_rejected(name, served.model.version)
        raise error

    @staticmethod
    def _overloaded(served: Served, why: str) -> OverloadedError:
        retry = min(RETRY_AFTER_MAX_S, max(RETRY_AFTER_MIN_S, served.retry_after()))
        return OverloadedError(
            f"model {served.name!r} is overloaded ({why})",
            retry_after=retry,
            hint=f"retry after {retry:.3g} s, or raise max_in_flight/max_queue for this model",
        )

    def _release(self, served: Served) -> None:
        with self._lock:
            served.active -= 1
            close = served.retired and served.active == 0 and not served.closed
            if close:
                served.closed = True
        if close:
            self._close_model(served)

    def record_failure(self, name: str, start: float, exc: BaseException) -> None:
        """Count a failed request of ``name`` (started at ``start``, perf_counter) by its reason."""
        if not isinstance(exc, asyncio.CancelledError):
            self.metrics.observe_request(name, time.perf_counter() - start, error=_reason(exc))

    def _before(
        self, served: Served, inputs: Mapping[str, Any], outputs: Sequence[str] | None, t: RequestTiming
    ) -> tuple[dict[str, np.ndarray], bytes | None, dict[str, np.ndarray] | None]:
        """Validate, then look up the cache: returns (validated inputs, cache key, cached outputs)."""
        cpu0 = time.thread_time_ns() if t.cpu else 0
        if outputs:
            unknown = [o for o in outputs if o not in served.output_names]
            if unknown:
                raise InputError(
                    f"model {served.name!r} has no output(s) {unknown}; "
                    f"outputs are {sorted(served.output_names)}"
                )
        validated = served.model.validate(inputs)
        if served.config.nan_policy == "reject":
            for name in served.float_inputs:
                if not np.isfinite(validated[name]).all():
                    raise InputError(
                        f"input {name!r} contains NaN or Inf, which model {served.name!r} rejects",
                        hint='clean the input, or set nan_policy = "allow" for this model',
                    )
        t.rows = batch_rows(validated)
        t.validated_ns = time.monotonic_ns()
        t.input_ns = t.validated_ns - t.admitted_ns
        if cpu0:
            t.cpu_input_ns += time.thread_time_ns() - cpu0
        if served.cache is None:
            return validated, None, None
        key = cache_key(served.name, served.model.version, validated, outputs)
        hit = served.cache.get(key)
        self.metrics.observe_cache(served.name, hit is not None)
        t.cached = hit is not None
        return validated, key, hit

    def _after(
        self,
        served: Served,
        out: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        key: bytes | None,
        t: RequestTiming,
        *,
        cached: bool,
    ) -> InferResult:
        start = time.monotonic_ns()
        cpu0 = time.thread_time_ns() if t.cpu else 0
        if outputs:
            out = {o: out[o] for o in outputs}
        if key is not None and not cached and served.cache is not None:
            served.cache.put(key, out)
        t.output_ns += time.monotonic_ns() - start
        if cpu0:
            t.cpu_output_ns += time.thread_time_ns() - cpu0
        return InferResult(out, served.name, served.model.version, cached=cached)

    def _run(
        self, served: Served, inputs: dict[str, np.ndarray], t: RequestTiming | None = None
    ) -> dict[str, np.ndarray]:
        """Run one (possibly batched) session call with progress tracking and batch-size metrics.

        With ``t`` (an unbatched request), its queue wait, run time and run CPU are stamped on it.
        """
        begin = time.monotonic_ns() if t is not None else 0
        cpu0 = time.thread_time_ns() if t is not None and t.cpu else 0
        with self._lock:
            if served.running == 0:
                served.last_progress = time.monotonic()
            served.running += 1
        try:
            out = served.model.run(inputs)
        except EdgertError:
            raise
        except Exception as exc:
            raise BackendError(
                f"model {served.name!r} failed while running: {type(exc).__name__}: {exc}"
            ) from None
        finally:
            with self._lock:
                served.running -= 1
                served.last_progress = time.monotonic()
        rows = t.rows if t is not None else batch_rows(inputs)
        if t is not None:
            t.queue_ns, t.infer_ns, t.batch_size = begin - t.validated_ns, time.monotonic_ns() - begin, rows
            if cpu0:
                t.cpu_infer_ns += time.thread_time_ns() - cpu0
        self.metrics.observe_batch(served.name, rows)
        return out

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="edgert-infer")
        return self._pool

    # -- lifecycle ---------------------------------------------------------------------------------
    def _prepare(self, model: ServableModel, config: ModelConfig, warmup: int) -> Served:
        served = prepare(model, config, warmup, self._run)
        if served.batcher is not None:
            served.batcher.on_batch = partial(self.stats.record_batch, config.name, model.version)
        return served

    # -- helpers -----------------------------------------------------------------------------------
    def _publish_info(self, served: Served) -> None:
        m = served.model
        self.metrics.set_model_info(
            served.name, version=m.version, provider=m.provider, fmt=m.format, load_seconds=m.load_seconds
        )

    def _unknown(self, name: str) -> UnknownModelError:
        known = sorted([*self._served, *self._cascades, *self.pipelines.names()])
        return UnknownModelError(
            f"unknown model {name!r}; served models: {known}",
            hint="list them with GET /v2/models or 'edgert models list'",
        )

    def served_model(self, name: str) -> ServableModel:
        """The model served under ``name`` (a cascade member); raises UnknownModelError."""
        with self._lock:
            served = self._served.get(name)
        if served is None:
            raise self._unknown(name)
        return served.model

    def cascade_members(self, name: str) -> tuple[str, str] | None:
        """(small, large) of the cascade served under ``name``; None when ``name`` is not a cascade."""
        cascade = self._cascades.get(name)
        return (cascade.small, cascade.large) if cascade is not None else None

    def served_version(self, name: str) -> str:
        """The version served under ``name``; raises UnknownModelError."""
        return self.served_model(name).version

    def _queue_depths(self) -> dict[str, float]:
        with self._lock:
            return {n: s.batcher.depth for n, s in self._served.items() if s.batcher is not None}

    def _in_flight(self) -> dict[str, float]:
        with self._lock:
            return {n: s.active for n, s in self._served.items()}
