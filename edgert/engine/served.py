"""One served model version: its config, batcher, cache, admission counters and progress clock.

Also the checks done before a model serves: batchability, signature compatibility for swaps,
and the warm-up that measures latency to choose between inline and threaded execution; and
:func:`prepare`, which does both and builds the batcher.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from edgert.engine.batcher import Batcher
from edgert.engine.cache import ResultCache
from edgert.engine.config import ModelConfig, ServableModel
from edgert.errors import BackendError, ConfigError, EdgertError

__all__ = [
    "INLINE_THRESHOLD_S",
    "Progress",
    "Served",
    "check_batchable",
    "check_compatible",
    "prepare",
    "warm_up",
]

log = logging.getLogger("edgert.engine")

#: Models whose warm run takes less than this run inline on the caller's thread (the event loop)
#: when not batching: digits takes ~20 us, while a hand-off to a worker thread and back costs
#: ~50-100 us of wake-ups, so threading would more than double its latency. Slower models
#: (MobileNetV2: ~2 ms) run on the engine's thread pool so the loop keeps serving.
INLINE_THRESHOLD_S = 200e-6


@dataclass(frozen=True)
class Progress:
    """Supervision view of a model: runs in progress and the monotonic time of the last progress."""

    running: int
    last_progress: float

    def stalled(self, now: float, limit_s: float) -> bool:
        """True when a run has been going for ``limit_s`` with no run finishing (a hung session)."""
        return self.running > 0 and now - self.last_progress > limit_s


class Served:
    """Mutable serving state of one model version; counters are guarded by the engine's lock."""

    def __init__(
        self, model: ServableModel, config: ModelConfig, *, max_batch: int, run_seconds: float
    ) -> None:
        self.model = model
        self.config = config
        self.name = config.name
        self.max_batch = max_batch
        self.run_seconds = run_seconds
        self.inline = max_batch == 0 and run_seconds < INLINE_THRESHOLD_S
        self.cache = ResultCache(config.cache_bytes) if config.cache_bytes else None
        self.batcher: Batcher | None = None
        self.output_names = frozenset(o.name for o in model.outputs)
        self.float_inputs = tuple(s.name for s in model.inputs if np.dtype(s.dtype).kind == "f")
        self.active = 0  # admitted, unfinished requests
        self.running = 0  # session runs in progress
        self.last_progress = time.monotonic()
        self.retired = False  # replaced or removed: close when the last request leaves
        self.closed = False

    def retry_after(self) -> float:
        """Estimated seconds until this model has room again (queued work / batch parallelism)."""
        per_run = max(self.run_seconds, 1e-4)
        return self.active * per_run / max(1, self.max_batch)


def check_batchable(model: ServableModel, name: str) -> None:
    """Raise ConfigError unless every input and output has a dynamic batch dim and static others."""
    for kind, specs in (("input", model.inputs), ("output", model.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] is not None:
                raise ConfigError(
                    f"model {name!r}: dynamic batching needs a dynamic batch dimension, but {kind} "
                    f"{spec.describe()} has a fixed one",
                    hint="set max_batch_size = 0 for this model, or export it with a dynamic batch axis",
                )
            if kind == "input" and any(d is None for d in spec.shape[1:]):
                raise ConfigError(
                    f"model {name!r}: dynamic batching needs static non-batch dimensions, but input "
                    f"{spec.describe()} has dynamic ones",
                    hint="set max_batch_size = 0 for this model",
                )


def check_compatible(old: ServableModel, new: ServableModel, name: str) -> None:
    """Raise ConfigError when ``new`` changes input names/dtypes/ranks, which would break clients."""

    def sig(m: ServableModel) -> dict[str, tuple[str, int]]:
        return {s.name: (np.dtype(s.dtype).name, len(s.shape)) for s in m.inputs}

    if sig(old) != sig(new):
        raise ConfigError(
            f"cannot swap model {name!r} to version {new.version!r}: its inputs "
            f"{sorted(sig(new).items())} differ from the served ones {sorted(sig(old).items())}",
            hint="serve the new signature under a new model name",
        )


def warm_up(model: ServableModel, runs: int) -> float:
    """Run ``model`` on zero inputs ``runs`` times (at least 2); return the median warm run in seconds.

    The first run is excluded from the timing: it pays one-off allocation costs.
    """
    inputs = {
        spec.name: np.zeros([1 if d is None else d for d in spec.shape], dtype=np.dtype(spec.dtype))
        for spec in model.inputs
    }
    timings = []
    try:
        for _ in range(max(runs, 2)):
            start = time.perf_counter()
            model.run(inputs)
            timings.append(time.perf_counter() - start)
    except EdgertError:
        raise
    except Exception as exc:
        raise BackendError(
            f"warm-up of model {model.name!r} version {model.version!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    return statistics.median(timings[1:])


def prepare(
    model: ServableModel,
    config: ModelConfig,
    warmup: int,
    run: Callable[[Served, dict[str, np.ndarray]], dict[str, np.ndarray]],
) -> Served:
    """Check and warm up ``model``, then wrap it for serving; ``run`` executes one batch for the batcher."""
    max_batch = config.max_batch_size
    if max_batch and model.max_batch:
        max_batch = min(max_batch, model.max_batch)  # the runtime's limit for this model/profile
    if max_batch:
        check_batchable(model, config.name)
    run_seconds = warm_up(model, warmup)
    served = Served(model, config, max_batch=max_batch, run_seconds=run_seconds)
    if max_batch:
        served.batcher = Batcher(
            config.name,
            partial(run, served),
            max_batch_size=max_batch,
            max_queue_delay_us=config.max_queue_delay_us,
            preferred_batch_sizes=config.preferred_batch_sizes,
        )
    log.info(
        "serving model",
        extra={
            "model": config.name,
            "version": model.version,
            "provider": model.provider,
            "max_batch": max_batch,
            "placement": "batcher" if max_batch else ("inline" if served.inline else "pool"),
            "warm_run_us": round(run_seconds * 1e6, 1),
        },
    )
    return served
