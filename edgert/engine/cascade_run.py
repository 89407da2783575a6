"""The cascade request path: the small model on every row, the large one on the rows it is unsure of.

The rule that picks those rows lives in :mod:`edgert.engine.cascade`; this module checks a cascade's
member models, describes it, and runs a request through an :class:`~edgert.engine.engine.Engine`'s
member models, merging their outputs, through the engine's public lookup and failure-counting methods.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgert.engine.cascade import escalate_mask, merge_rows
from edgert.engine.config import CascadeConfig, InferResult, ModelInfo, ServableModel
from edgert.engine.served import check_compatible
from edgert.errors import ConfigError, InputError

if TYPE_CHECKING:
    from edgert.engine.engine import Engine

__all__ = ["cascade_info", "check_members", "run_cascade_async", "run_cascade_sync"]


def check_members(config: CascadeConfig, small: ServableModel, large: ServableModel) -> None:
    """Raise ConfigError unless ``small`` and ``large`` can serve as the cascade ``config``."""
    check_compatible(small, large, config.name)
    for member in (small, large):
        if config.output not in {o.name for o in member.outputs}:
            raise ConfigError(
                f"cascade {config.name!r}: model {member.name!r} has no output {config.output!r}"
            )
    if any(not s.shape or s.shape[0] is not None for s in small.inputs):
        raise ConfigError(
            f"cascade {config.name!r}: inputs need a dynamic batch dimension for per-row escalation"
        )


def cascade_info(name: str, small: ServableModel, large: ServableModel, *, ready: bool) -> ModelInfo:
    """Describe the cascade ``name``: the small model's signature, both members' versions and providers."""
    return ModelInfo(
        name=name,
        versions=(f"{small.version}+{large.version}",),
        inputs=tuple(small.inputs),
        outputs=tuple(small.outputs),
        provider=f"cascade({small.provider},{large.provider})",
        format=small.format,
        ready=ready,
        kind="cascade",
    )


async def run_cascade_async(
    engine: Engine,
    cfg: CascadeConfig,
    inputs: Mapping[str, Any],
    version: str | None,
    outputs: Sequence[str] | None,
    start: float,
) -> InferResult:
    """Serve one cascade request on the event loop; failures are recorded under the cascade's name."""
    try:
        x = _inputs(engine, cfg, inputs, version)
        small = await engine.infer(cfg.small, x)
        mask = _split(cfg, small)
        large = await engine.infer(cfg.large, {k: v[mask] for k, v in x.items()}) if mask.any() else None
        return _result(engine, cfg, small, large, mask, outputs, start)
    except BaseException as exc:
        engine.record_failure(cfg.name, start, exc)
        raise


def run_cascade_sync(
    engine: Engine,
    cfg: CascadeConfig,
    inputs: Mapping[str, Any],
    version: str | None,
    outputs: Sequence[str] | None,
    start: float,
) -> InferResult:
    """Blocking :func:`run_cascade_async` for threads."""
    try:
        x = _inputs(engine, cfg, inputs, version)
        small = engine.infer_sync(cfg.small, x)
        mask = _split(cfg, small)
        large = engine.infer_sync(cfg.large, {k: v[mask] for k, v in x.items()}) if mask.any() else None
        return _result(engine, cfg, small, large, mask, outputs, start)
    except BaseException as exc:
        engine.record_failure(cfg.name, start, exc)
        raise


def _inputs(
    engine: Engine, cfg: CascadeConfig, inputs: Mapping[str, Any], version: str | None
) -> dict[str, Any]:
    """Check the requested version, then validate the inputs against the small model."""
    engine.get(cfg.name, version)  # raises for a wrong version
    small = engine.served_model(cfg.small)
    expected = {s.name for s in small.inputs}
    if isinstance(inputs, Mapping) and inputs.keys() != expected:
        # Name the cascade the caller asked for, not its internal member model.
        got = sorted(map(str, inputs.keys()))
        raise InputError(
            f"model {cfg.name!r} expects inputs {sorted(expected)}, got {got}",
            hint=f"GET /v2/models/{cfg.name} lists its inputs",
        )
    return small.validate(inputs)


def _split(cfg: CascadeConfig, small: InferResult) -> np.ndarray:
    return escalate_mask(small.outputs[cfg.output], cfg.rule, cfg.threshold)


def _result(
    engine: Engine,
    cfg: CascadeConfig,
    small: InferResult,
    large: InferResult | None,
    mask: np.ndarray,
    outputs: Sequence[str] | None,
    start: float,
) -> InferResult:
    """Merge the escalated rows back, select ``outputs`` and record the cascade's metrics."""
    merged = merge_rows(small.outputs, large.outputs, mask) if large is not None else small.outputs
    if outputs:
        missing = [o for o in outputs if o not in merged]
        if missing:
            raise InputError(f"cascade {cfg.name!r} has no output(s) {missing}; outputs are {sorted(merged)}")
        merged = {o: merged[o] for o in outputs}
    escalated = int(mask.sum())
    engine.metrics.observe_cascade(cfg.name, int(mask.shape[0]), escalated)
    engine.metrics.observe_request(cfg.name, time.perf_counter() - start)
    version = f"{small.model_version}+{large.model_version if large else engine.served_version(cfg.large)}"
    return InferResult(merged, cfg.name, version, escalated=escalated > 0, escalated_rows=escalated)
