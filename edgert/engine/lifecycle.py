"""Hot swap, retirement, drain and close of served models: the engine's lifecycle half.

:class:`edgert.engine.engine.Engine` inherits these; they share its lock, its served table and its
pipelines. Kept apart so the request path (engine.py) and the lifecycle read on their own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from edgert.engine.config import CascadeConfig, ModelConfig, ServableModel
from edgert.engine.served import Served, check_compatible
from edgert.errors import BackendError, UnknownModelError

if TYPE_CHECKING:
    from edgert.engine.pipeline import PipelineSet

__all__ = ["DRAIN_POLL_S", "SWAP_DRAIN_TIMEOUT_S", "EngineLifecycle"]

log = logging.getLogger("edgert.engine")

#: How long a swap waits for requests still running on the old version before abandoning it.
SWAP_DRAIN_TIMEOUT_S = 30.0
#: Poll interval while waiting for in-flight requests to finish (drain, swap).
DRAIN_POLL_S = 0.002


class EngineLifecycle:
    """Swap, retire, drain and close; mixed into :class:`~edgert.engine.engine.Engine`."""

    _lock: threading.Lock
    _served: dict[str, Served]
    _cascades: dict[str, CascadeConfig]
    _draining: bool
    _pool: ThreadPoolExecutor | None
    pipelines: PipelineSet

    def _prepare(self, model: ServableModel, config: ModelConfig, warmup: int) -> Served:
        raise NotImplementedError

    def _publish_info(self, served: Served) -> None:
        raise NotImplementedError

    def _unknown(self, name: str) -> UnknownModelError:
        raise NotImplementedError

    def _in_flight(self) -> dict[str, float]:
        raise NotImplementedError

    async def swap(
        self,
        name: str,
        new_model: ServableModel,
        *,
        warmup: int = 3,
        drain_timeout: float = SWAP_DRAIN_TIMEOUT_S,
    ) -> None:
        """Warm up ``new_model`` beside the served one, switch atomically, then retire the old one.

        Requests admitted before the switch finish on the old version; it closes when the last one
        leaves. On failure (incompatible inputs, warm-up error) the old version keeps serving, the
        new model is closed (the engine owns it) and the error is raised. If old requests are still
        running after ``drain_timeout`` (a hung session), queued ones fail and the old session is
        abandoned unclosed, because closing a session mid-run is unsafe.
        """
        with self._lock:
            old = self._served.get(name)
        if old is None:
            raise self._unknown(name)
        try:
            check_compatible(old.model, new_model, name)
            self.pipelines.check_swap(name, new_model)
            new = await asyncio.to_thread(self._prepare, new_model, old.config, warmup)
        except BaseException:
            log.warning(
                "swap failed; the old version keeps serving",
                extra={"model": name, "version": old.model.version, "new_version": new_model.version},
            )
            await asyncio.to_thread(new_model.close)
            raise
        with self._lock:
            self._served[name] = new
        self._publish_info(new)
        log.info(
            "swapped model",
            extra={"model": name, "old_version": old.model.version, "version": new_model.version},
        )
        await asyncio.to_thread(self._retire, old)
        deadline = time.monotonic() + drain_timeout
        while not old.closed and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if not old.closed:
            log.error(
                "old version still busy after the swap; abandoning its session",
                extra={"model": name, "version": old.model.version, "active": old.active},
            )
            if old.batcher is not None:
                old.batcher.stop(
                    BackendError(
                        f"model {name!r} was restarted while this request waited", hint="retry the request"
                    )
                )

    def _retire(self, served: Served) -> None:
        """Stop admitting to ``served``; drain its batch queue; close it now or when its last request ends."""
        with self._lock:
            served.retired = True
        if served.batcher is not None:
            served.batcher.stop()
        with self._lock:
            close = served.active == 0 and not served.closed
            if close:
                served.closed = True
        if close:
            self._close_model(served)

    def _close_model(self, served: Served) -> None:
        try:
            served.model.close()
        except Exception:  # closing must not fail a request; log and move on
            log.exception("closing model failed", extra={"model": served.name})

    async def drain(self, timeout: float) -> None:
        """Stop admitting requests and wait up to ``timeout`` s for in-flight ones to finish."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + timeout
        while any(v for v in self._in_flight().values()) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        left = sum(self._in_flight().values())
        if left:
            log.warning("drain timed out", extra={"in_flight": left})

    def close(self) -> None:
        """Stop all batchers, close all models and the thread pool (after :meth:`drain`)."""
        with self._lock:
            self._draining = True
            served = list(self._served.values())
            self._served.clear()
            self._cascades.clear()
            self.pipelines.clear()
            pool, self._pool = self._pool, None
        for s in served:
            self._retire(s)
        if pool is not None:
            pool.shutdown(wait=True)

