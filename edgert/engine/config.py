"""Engine data types: per-model serving config, cascade config, results and model descriptions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edgert.backends.base import TensorSpec
from edgert.engine.cascade import RULES
from edgert.errors import ConfigError

__all__ = ["CascadeConfig", "InferResult", "ModelConfig", "ModelInfo", "ServableModel"]

NAN_POLICIES = ("allow", "reject")


class ServableModel(Protocol):
    """What the engine needs from a loaded model (``edgert.runtime.Model`` satisfies it)."""

    name: str
    version: str
    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch: int | None
    load_seconds: float

    @property
    def provider(self) -> str:
        """The effective execution provider."""
        ...

    def validate(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Check and coerce inputs; raises InputError."""
        ...

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run validated inputs."""
        ...

    def close(self) -> None:
        """Release the session."""
        ...


def _check(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: {message}")


@dataclass(frozen=True)
class ModelConfig:
    """How the engine serves one model: batching, cache, admission limits and NaN policy.

    ``max_batch_size = 0`` disables dynamic batching; ``cache_bytes = 0`` disables the result cache.
    ``max_in_flight`` bounds admitted, unfinished requests (queued or running) and ``max_queue``
    bounds requests waiting in the batch queue: together they bound memory.
    """

    name: str
    max_batch_size: int = 0
    max_queue_delay_us: int = 500
    preferred_batch_sizes: tuple[int, ...] = ()
    cache_bytes: int = 0
    max_in_flight: int = 64
    max_queue: int = 256
    nan_policy: str = "allow"

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        _check(bool(self.name) and "/" not in self.name, where, "name must be non-empty and contain no '/'")
        _check(self.max_batch_size >= 0, where, f"max_batch_size must be >= 0, got {self.max_batch_size}")
        _check(
            self.max_queue_delay_us >= 0,
            where,
            f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}",
        )
        for size in self.preferred_batch_sizes:
            _check(
                0 < size <= max(self.max_batch_size, 1),
                where,
                f"preferred_batch_sizes entry {size} must be in 1..max_batch_size ({self.max_batch_size})",
            )
        _check(self.cache_bytes >= 0, where, f"cache_bytes must be >= 0, got {self.cache_bytes}")
        _check(self.max_in_flight >= 1, where, f"max_in_flight must be >= 1, got {self.max_in_flight}")
        _check(self.max_queue >= 1, where, f"max_queue must be >= 1, got {self.max_queue}")
        _check(
            self.nan_policy in NAN_POLICIES,
            where,
            f"nan_policy must be one of {', '.join(NAN_POLICIES)}, got {self.nan_policy!r}",
        )


@dataclass(frozen=True)
class CascadeConfig:
    """A virtual model: run ``small``, escalate uncertain rows (by ``rule`` on ``output``) to ``large``."""

    name: str
    small: str
    large: str
    rule: str
    threshold: float
    output: str = "logits"

    def __post_init__(self) -> None:
        where = f"cascade {self.name!r}"
        _check(bool(self.name) and "/" not in self.name, where, "name must be non-empty and contain no '/'")
        _check(self.rule in RULES, where, f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        _check(0.0 <= self.threshold <= 1.0, where, f"threshold must be in [0, 1], got {self.threshold}")
        _check(self.small != self.large, where, "small and large must be different models")
        _check(self.name not in (self.small, self.large), where, "name must differ from its member models")


@dataclass
class InferResult:
    """Outputs of one request and who produced them."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    cached: bool = False
    escalated: bool | None = None  # cascades only: did any row go to the large model
    escalated_rows: int | None = None  # cascades only: how many rows did
    cold_load_s: float | None = None  # set by the daemon when the request waited for a load on demand


@dataclass(frozen=True)
class ModelInfo:
    """A served model (or cascade) as listed by :meth:`Engine.models`."""

    name: str
    versions: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    provider: str
    format: str
    ready: bool
    kind: str = "model"  # "model" | "cascade"
    max_batch_size: int = 0

    @property
    def version(self) -> str:
        """The version currently served."""
        return self.versions[0]
