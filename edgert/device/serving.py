"""The daemon as a ServingPort: what the HTTP and socket front ends call."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgert.errors import EdgertError, OverloadedError, ServeError, UnknownModelError
from edgert.metrics.timing import RequestTiming, Tracer
from edgert.serve.port import InferOutcome, ModelMeta, TensorMeta

if TYPE_CHECKING:
    from edgert.device.daemon import Daemon
    from edgert.device.deployer import Deployer

__all__ = ["ServingAdapter"]


def _tensors(specs: Sequence[Any]) -> tuple[TensorMeta, ...]:
    return tuple(TensorMeta(s.name, np.dtype(s.dtype), tuple(s.shape)) for s in specs)


class ServingAdapter:
    """Adapter from the servers' ServingPort interface to the daemon's engine."""

    def __init__(self, daemon: Daemon, tracer: Tracer | None = None) -> None:
        self.daemon = daemon
        self.engine = daemon.engine
        self.shadows = daemon.shadows  # the Deployer's candidates in shadow evaluation, by model name
        #: Request timings, trace context and the slow-request log ([daemon] slow_request_ms).
        self.tracer = tracer or Tracer()

    @property
    def stream_stats(self) -> Any:
        """Where stream sessions report open/dropped/lag (serve/stream_wire.py reads it)."""
        return self.daemon.metrics.streams

    def live(self) -> bool:
        """The process is up."""
        return True

    def ready(self) -> bool:
        """The daemon has started and is not draining; each model reports its own readiness (OIP)."""
        return self.daemon.is_ready and not self.daemon.draining

    def server_metadata(self) -> dict[str, Any]:
        """OIP server metadata."""
        from edgert import __version__

        return {
            "name": "edgert",
            "version": __version__,
            "extensions": ["binary_tensor_data", "model_repository", "statistics"],
        }

    def _not_serving(self, name: str, exc: UnknownModelError) -> UnknownModelError:
        """A configured model with no servable version gets the reason, not just "unknown"."""
        deployer = self.daemon.deployer
        item = deployer.unavailable.get(name) if deployer is not None else None
        if item is None:
            return exc
        return UnknownModelError(
            f"model {name!r} is configured but serves no version: {item.version or 'its active version'} "
            f"failed ({item.reason})",
            hint=f"install or activate a version that loads ('edgert models activate {name} VERSION'), "
                 "or roll back",
        )

    def _info(self, name: str, version: str | None) -> Any:
        try:
            info = self.engine.get(name, version)
        except UnknownModelError as exc:
            raise self._not_serving(name, exc) from None
        if version is not None and version not in info.versions:
            raise UnknownModelError(
                f"model {name!r} has no version {version!r} (serving {', '.join(info.versions)})"
            )
        return info

    def model_meta(self, name: str, version: str | None = None) -> ModelMeta:
        """Metadata of a served model or cascade; a configured model serving no version is not ready."""
        deployer = self.daemon.deployer
        lazy = self._lazy_meta(name) if version is None else None
        if lazy is not None:
            return lazy
        if deployer is not None and version is None and name in deployer.unavailable:
            # OIP readiness is per model: it exists (it is configured) but nothing can serve it.
            return ModelMeta(name=name, versions=(), platform="", inputs=(), outputs=(), ready=False,
                             provider="")
        info = self._info(name, version)
        return ModelMeta(
            name=info.name,
            versions=tuple(info.versions),
            platform=info.format,
            inputs=_tensors(info.inputs),
            outputs=_tensors(info.outputs),
            ready=bool(info.ready) and self.ready(),
            provider=info.provider,
        )

    def model_names(self) -> list[str]:
        """Served names."""
        memory = self._memory()
        return [info.name for info in self.engine.models()] + (memory.lazy_names() if memory else [])

    def _memory(self) -> Any:
        deployer = self.daemon.deployer
        return deployer.memory if deployer is not None else None

    def _lazy_meta(self, name: str) -> ModelMeta | None:
        """A lazy model that is not loaded: ready (its next request loads it), described by its manifest."""
        memory = self._memory()
        described = memory.describe(name) if memory is not None else None
        if described is None:
            return None
        version, fmt, inputs, outputs = described

        def metas(specs: Sequence[dict[str, Any]]) -> tuple[TensorMeta, ...]:
            return tuple(TensorMeta(s["name"], np.dtype(s["dtype"]), tuple(s["shape"])) for s in specs)

        return ModelMeta(name=name, versions=(version,), platform=fmt, inputs=metas(inputs),
                         outputs=metas(outputs), ready=self.ready(), provider="")

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
        """One request through the engine (offered to a shadow candidate of ``name`` once answered)."""
        shadow = self.shadows.get(name)  # one lookup; None unless a fleet shadow evaluation runs
        start = time.perf_counter() if shadow is not None else 0.0
        memory = self._memory()  # lazy loads and the memory budget: a lease keeps the model loaded
        try:
            cold = await memory.acquire(name) if memory is not None and memory.tracking else None
        except OverloadedError:
            raise  # busy models held the budget: retry later (503 with Retry-After)
        except EdgertError as exc:  # a failed cold load: it serves no version (404, as next time)
            raise UnknownModelError(exc.message, hint=exc.hint) from None
        if cold and timing is not None:
            timing.load_ns = int(cold * 1e9)  # the slow-request line shows the cold load as its own stage
        try:
            result = await self.engine.infer(
                name,
                inputs,
                version=version,
                outputs=list(outputs) if outputs is not None else None,
                request_id=request_id,
                timing=timing,
            )
        except UnknownModelError as exc:
            raise self._not_serving(name, exc) from None
        finally:
            if cold is not None:
                memory.release(name)
        if cold:
            result.cold_load_s = cold
        capture = self.daemon.capture
        if capture is not None:  # one lookup and, for captured models, one random draw
            capture.offer(
                name, inputs, result.outputs, version=result.model_version, request_id=request_id or ""
            )
        drift = getattr(self.daemon, "drift", None)
        if drift is not None:  # one lookup; a model with a reference profile stages its tensors
            drift.observe(name, result.model_version, inputs, result.outputs, request_id or "")
        if shadow is not None and not getattr(result, "cached", False):
            shadow.offer(inputs, result.outputs, time.perf_counter() - start)  # never blocks or raises
        return result

    def inference_stats(self, name: str | None = None, version: str | None = None) -> dict[str, Any]:
        """Triton's statistics document (edgert.engine.stats) for the served models."""
        infos = self.engine.models()
        kind = next((i.kind for i in infos if i.name == name), "model")
        if kind != "model":  # a cascade (or another composite): its members run the requests
            raise UnknownModelError(
                f"{name!r} is a {kind}: statistics are kept per member model",
                hint="GET /v2/models/stats lists every model with statistics",
            )
        served = [(i.name, v) for i in infos if i.kind == "model" for v in i.versions]
        try:
            return self.engine.stats.model_stats(served, name, version)
        except UnknownModelError as exc:
            if name is not None and version is None:  # a configured model serving no version says why
                raise self._not_serving(name, exc) from None
            raise

    async def load(self, name: str, version: str | None = None, *, allow_downgrade: bool = False) -> None:
        """Repository load: the Deployer serves ``name`` at ``version`` (the store's active one if None)."""
        await self._deployer().load(name, version, allow_downgrade=allow_downgrade, origin="repository")

    async def unload(self, name: str) -> None:
        """Repository unload: stop serving ``name``; the store keeps its versions."""
        await self._deployer().unload(name, origin="repository")

    def _deployer(self) -> Deployer:
        deployer = self.daemon.deployer
        if deployer is None:
            raise ServeError("the daemon is still starting", hint="retry once /v2/health/ready answers 200")
        return deployer

    def status(self) -> dict[str, Any]:
        """Daemon status."""
        return self.daemon.status()
