"""What the protocol front ends (OIP HTTP, Unix socket) need from the daemon: one small interface.

The servers never import the engine or the store; the daemon implements :class:`ServingPort` over
them, and tests can serve any object with these methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgert.errors import (
    ConfigError,
    EdgertError,
    InputError,
    ModelError,
    OverloadedError,
    RollbackError,
    SecurityError,
    ServeError,
    StoreError,
    UnknownModelError,
)
from edgert.metrics.timing import RequestTiming, Tracer

__all__ = ["InferOutcome", "ModelMeta", "ServingPort", "TensorMeta", "status_for"]


@dataclass(frozen=True)
class TensorMeta:
    """Name, dtype and shape (None = dynamic) of one model input or output."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ModelMeta:
    """What OIP model metadata reports."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMeta, ...]
    outputs: tuple[TensorMeta, ...]
    ready: bool = True
    provider: str = ""


class InferOutcome(Protocol):
    """Outputs plus the model name and version that really answered (the engine's InferResult)."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str


class ServingPort(Protocol):
    """The daemon as seen by the servers."""

    #: Starts each request's timing and trace context; logs slow requests.
    tracer: Tracer

    def live(self) -> bool:
        """True while the process is up."""
        ...

    def ready(self) -> bool:
        """True once every configured model serves (and not draining)."""
        ...

    def server_metadata(self) -> dict[str, Any]:
        """OIP server metadata: name, version, extensions."""
        ...

    def model_meta(self, name: str, version: str | None = None) -> ModelMeta:
        """Metadata of a served model; raises UnknownModelError."""
        ...

    def model_names(self) -> list[str]:
        """Names of everything served (models and cascades)."""
        ...

    async def infer(
        self,
        name: str,
        inputs: dict[str, np.ndarray],
        *,
        version: str | None = None,
        outputs: Sequence[str] | None = None,
        request_id: str | None = None,
        timing: RequestTiming | None = None,
    ) -> InferOutcome:
        """Run one request through the engine (``timing``: its stages, filled on the way)."""
        ...

    def inference_stats(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton statistics-extension document for ``name``/``version`` (all models when None)."""
        ...

    async def load(self, name: str, version: str | None = None, *, allow_downgrade: bool = False) -> None:
        """Load (or hot-swap to) a model version: Triton's repository load (anti-rollback applies)."""
        ...

    async def unload(self, name: str) -> None:
        """Stop serving a model."""
        ...

    def status(self) -> dict[str, Any]:
        """Daemon status: version, profile, providers, active versions, uptime."""
        ...


#: Exception class -> HTTP status, most specific first.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (UnknownModelError, 404),
    (RollbackError, 409),  # below the anti-rollback floor: a conflict with what was installed
    (InputError, 400),
    (OverloadedError, 503),
    (SecurityError, 400),
    (StoreError, 404),
    (ModelError, 400),
    (ConfigError, 400),
    (ServeError, 503),
    (EdgertError, 500),
)


def status_for(exc: BaseException) -> int:
    """The HTTP status code for an exception raised while serving a request."""
    for cls, code in _STATUS:
        if isinstance(exc, cls):
            return code
    return 500


def error_text(exc: BaseException) -> str:
    """The client-facing message: EdgertError text (with hint) only; never internals of other errors."""
    if isinstance(exc, EdgertError):
        return str(exc)
    return "internal error; see the daemon log"
