"""Lazy loads and the memory budget on the device: which models stay loaded.

The decision is :func:`edgert.device.budget.plan_room` (pure); every load and unload is the Deployer's
(its normal path: floor, variants in the profile's order, health check, swap). This module keeps the
books between them:

- each request to a configured model holds a *lease* on it while it runs (:meth:`MemoryKeeper.acquire`,
  :meth:`MemoryKeeper.release`); a leased model is busy and is never unloaded, so making room never
  fails a request that was admitted;
- a request for a model that is not loaded (``load = "lazy"``, or unloaded earlier for room) starts
  one load, and every concurrent request for that model waits for the same load (single flight);
- before a load, the least recently used idle unpinned models are unloaded until the model's expected
  footprint (its last measurement, else its decrypted size) fits; loads are serialised, so the
  resident-set growth measured around one is that model's; if the measurement is larger than
  expected, more are unloaded; a model bigger than the whole budget is refused.

Cold loads and unloads for room change no version, so they are logged and counted in metrics, not
audited (the audit trail records which version serves, which they leave alone).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgert.config import ModelEntry
from edgert.device.budget import (
    MIB,
    NEVER,
    WAIT,
    Loaded,
    footprint_of,
    mb,
    plan_room,
    prime_runtime,
    resident_bytes,
    trim_heap,
)
from edgert.errors import ConfigError, EdgertError, ModelError, OverloadedError, UnknownModelError

if TYPE_CHECKING:
    from edgert.device.deployer import Deployer

__all__ = ["COLD_LOAD", "MEASURE_RUNS", "ROOM_WAIT_TIMEOUT_S", "MemoryKeeper"]

log = logging.getLogger("edgert.device.lazy")

#: The Deployer's reason for a load on demand.
COLD_LOAD = "cold-load"
#: How long a load waits for busy models to go idle when only they could make room (seconds).
ROOM_WAIT_TIMEOUT_S = 30.0
#: Runs of a freshly loaded model before its footprint is read (the arena grows on the first runs).
MEASURE_RUNS = 2
#: Retry-After given when the budget is held by busy models for too long.
ROOM_RETRY_AFTER_S = 1.0

Load = Callable[[ModelEntry, str], Awaitable[tuple[Any, str, str]]]


@dataclass
class _Slot:
    footprint: int = 0  # bytes, measured at its last load; 0 = never measured
    loaded: bool = False  # counted in the budget
    leases: int = 0  # requests holding it
    last_used: int = 0  # the keeper's logical clock at its last request
    evicted: bool = False  # unloaded for room: it loads again on its next request
    cold_loads: int = 0
    cold_seconds: float = 0.0
    evictions: int = 0
    held: bool = False  # the engine refused to unload it (a cascade or pipeline uses it): never a victim


class MemoryKeeper:
    """The Deployer's book of loaded models under ``budget`` bytes (0: no budget, lazy loads only)."""

    def __init__(self, deployer: Deployer, budget: int) -> None:
        self.deployer = deployer
        self.budget = budget
        self.tracking = budget > 0  # set at boot: a budget, or any lazy model configured
        self._slots: dict[str, _Slot] = {}
        self._clock = 0
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._pending: dict[str, int] = {}  # bytes reserved by loads in progress
        self._load_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self.refused: dict[str, str] = {}  # models over the budget, and why
        self._primed = False

    # ---- requests ------------------------------------------------------------------------------
    async def acquire(self, name: str) -> float | None:
        """Hold ``name`` for one request, loading it first when it loads on demand.

        Returns None when no lease was taken (nothing tracked, or not a configured model), else the
        seconds this request waited for a cold load (0.0 when the model was loaded). Pair with
        :meth:`release` whenever it returns a number.
        """
        if not self.tracking:
            return None
        slot = self._slots.get(name)
        if slot is None:
            try:
                self.deployer.entry(name)
            except UnknownModelError:
                return None  # a cascade or an unknown name: the engine answers
            slot = self._slots[name] = _Slot()
        self._clock += 1
        slot.last_used = self._clock
        slot.leases += 1
        if self.deployer.serving(name) or not self._on_demand(name, slot):
            return 0.0
        start = time.perf_counter()
        try:
            task = self._loading.get(name)
            if task is None:
                task = self._loading[name] = asyncio.ensure_future(self._cold_load(name))
            await asyncio.shield(task)
        except BaseException:
            self.release(name)
            raise
        return max(time.perf_counter() - start, 1e-9)

    def release(self, name: str) -> None:
        """The request that acquired ``name`` has finished."""
        slot = self._slots.get(name)
        if slot is not None:
            slot.leases -= 1
            if slot.leases <= 0:
                self._idle.set()

    def _on_demand(self, name: str, slot: _Slot) -> bool:
        if name in self.deployer.unavailable:
            return False  # failed: the engine's answer carries the reason until it is deployed again
        return slot.evicted or self.deployer.entry(name).load == "lazy"

    async def _cold_load(self, name: str) -> None:
        entry = self.deployer.entry(name)
        start = time.perf_counter()
        try:
            await self.deployer.deploy(name, entry.version or None, origin="lazy", reason=COLD_LOAD)
        except OverloadedError:
            raise  # busy models held the room: this request fails with Retry-After, the model does not
        except EdgertError as exc:
            self.deployer.mark_unavailable(entry, entry.version or None, exc)
            raise
        finally:
            self._loading.pop(name, None)
        slot = self._slot(name)
        slot.cold_loads += 1
        slot.cold_seconds += time.perf_counter() - start
        slot.evicted = False
        log.info("cold load", extra={"model": name, "ms": round((time.perf_counter() - start) * 1000, 1),
                                     "footprint_mb": round(slot.footprint / MIB, 2)})

    # ---- the Deployer's load path --------------------------------------------------------------
    async def measured_load(self, entry: ModelEntry, version: str, load: Load) -> tuple[Any, str, str]:
        """``load`` (the Deployer's variant loop) within the budget: make room, load, measure, check."""
        name = entry.name
        async with self._load_lock:
            lower = await asyncio.to_thread(self.deployer.source.size_hint, entry, version)
            need = max(self._slot(name).footprint, lower)
            await self._make_room(name, need)
            self._pending[name] = need
            try:
                before = await asyncio.to_thread(resident_bytes)
                model, variant, why = await load(entry, version)
                try:
                    footprint = await asyncio.to_thread(_measure, model, before, lower)
                    self._slot(name).footprint = footprint
                    self._pending[name] = 0
                    await self._make_room(name, footprint)
                    self._pending[name] = footprint
                except BaseException:
                    await asyncio.to_thread(model.close)
                    raise
            except BaseException:
                self._pending.pop(name, None)
                raise
        return model, variant, why

    def settled(self, name: str, *, ok: bool) -> None:
        """A deployment of ``name`` finished: on success its measured footprint counts as loaded."""
        footprint = self._pending.pop(name, None)
        if not ok:
            return
        slot = self._slot(name)
        slot.loaded = True
        if footprint is not None:
            slot.footprint = footprint
        self.refused.pop(name, None)

    def unloaded(self, name: str) -> None:
        """``name`` was unloaded on request (repository unload, reload): it no longer counts."""
        slot = self._slots.get(name)
        if slot is not None:
            slot.loaded = slot.evicted = False
            trim_heap()

    async def _make_room(self, name: str, need: int) -> None:
        if self.budget <= 0:
            return
        deadline = time.monotonic() + ROOM_WAIT_TIMEOUT_S
        while True:
            pending = sum(b for n, b in self._pending.items() if n != name)
            room = plan_room(self._view(), need, self.budget, pending=pending, name=f"model {name!r}")
            if room.verdict == NEVER:
                self.refused[name] = room.why
                raise ModelError(room.why, hint="raise [daemon] memory_budget_mb, unpin other models, or "
                                                "serve a smaller variant of this model")
            if room.verdict != WAIT:
                if all([self._evict(victim, name) for victim in room.victims]):
                    return
                continue  # one was held by a cascade or pipeline: plan again without it
            left = deadline - time.monotonic()
            if left <= 0:
                raise OverloadedError(f"no room to load model {name!r}: {room.why}",
                                      retry_after=ROOM_RETRY_AFTER_S,
                                      hint="retry shortly, or raise [daemon] memory_budget_mb")
            self._idle.clear()
            try:
                await asyncio.wait_for(self._idle.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _view(self) -> list[Loaded]:
        members = {m for c in self.deployer.cascade_entries() for m in (c.small, c.large)}
        out = []
        for name, slot in self._slots.items():
            if not slot.loaded:
                continue
            try:
                pinned = self.deployer.entry(name).pin or name in members
            except UnknownModelError:
                pinned = False
            busy = slot.leases > 0 or self.deployer.deploying(name)
            out.append(Loaded(name, slot.footprint, pinned or slot.held, busy, slot.last_used))
        return out

    def _evict(self, name: str, for_model: str) -> bool:
        slot = self._slot(name)
        try:
            self.deployer.unload_for_room(name)
        except UnknownModelError:
            pass  # not served any more: nothing to unload, it no longer counts
        except EdgertError as exc:  # used by a cascade or pipeline: it stays, and is treated as pinned
            slot.held = True
            log.warning("model is in use by a cascade or pipeline; not unloaded for room",
                        extra={"model": name, "error": exc.message[:200]})
            return False
        slot.loaded, slot.evicted = False, True
        slot.evictions += 1
        trim_heap()
        log.info("model unloaded to make room", extra={
            "model": name, "for": for_model, "footprint_mb": round(slot.footprint / MIB, 2)})
        return True

    def _slot(self, name: str) -> _Slot:
        slot = self._slots.get(name)
        if slot is None:
            slot = self._slots[name] = _Slot()
        return slot

    # ---- boot ----------------------------------------------------------------------------------
    def before_boot(self, entries: Sequence[ModelEntry], source: str) -> list[ModelEntry]:
        """The entries to load now (eager ones, pinned first); refuses a budget the pinned set cannot fit."""
        self.tracking = self.budget > 0 or any(m.load == "lazy" for m in self.deployer.entries())
        if self.budget > 0:
            pinned = []
            for e in self.deployer.entries():
                if e.pin:
                    pinned.append((e.name, self._lower_bound(e)))
            total = sum(b for _, b in pinned)
            if total > self.budget:
                raise ConfigError(_pinned_text(source, self.budget, pinned, "need at least"),
                                  hint=_PINNED_HINT)
            if not self._primed:
                self._primed = True
                try:
                    prime_runtime(self.deployer.source.runtime)
                except EdgertError as exc:  # no onnxruntime: the first model's footprint includes its start
                    log.warning("could not prime the runtime", extra={"error": exc.message[:200]})
        now = [e for e in entries if e.load == "eager" or self.deployer.serving(e.name)]
        return sorted(now, key=lambda e: not e.pin)

    def after_boot(self, source: str) -> None:
        """Refuse to run when the pinned models' measured footprints (or a refused one) pass the budget."""
        if self.budget <= 0:
            return
        pinned = [e for e in self.deployer.entries() if e.pin]
        refused = [self.refused[e.name] for e in pinned if e.name in self.refused]
        measured = [(e.name, self._slot(e.name).footprint) for e in pinned if self._slot(e.name).loaded]
        if refused:
            raise ConfigError(f"{source}: daemon.memory_budget_mb: {'; '.join(refused)}", hint=_PINNED_HINT)
        if sum(b for _, b in measured) > self.budget:
            raise ConfigError(_pinned_text(source, self.budget, measured, "measured"), hint=_PINNED_HINT)

    def _lower_bound(self, entry: ModelEntry) -> int:
        try:
            version = self.deployer.source.resolve_version(entry, entry.version or None)
            return int(self.deployer.source.size_hint(entry, version))
        except (EdgertError, OSError):
            return 0  # not installed: boot reports it

    # ---- views ---------------------------------------------------------------------------------
    def lazy_names(self) -> list[str]:
        """Configured models that load on their next request and are not loaded now."""
        names = []
        for e in self.deployer.entries():
            slot = self._slots.get(e.name)
            if (e.load == "lazy" or (slot is not None and slot.evicted)) and e.name not in \
                    self.deployer.unavailable and not self.deployer.serving(e.name):
                names.append(e.name)
        return names

    def describe(self, name: str) -> tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]] | None:
        """(version, format, inputs, outputs) of a lazy model that is not loaded, from its manifest."""
        if name not in self.lazy_names():
            return None
        entry = self.deployer.entry(name)
        version = self.deployer.source.resolve_version(entry, entry.version or None)
        fmt, inputs, outputs = self.deployer.source.describe(entry, version)
        return version, fmt, inputs, outputs

    def annotate(self, models: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Add each model's state (loaded, lazy, failed) and footprint to ``models``; the budget summary."""
        for name in self.lazy_names():
            models[name] = {"version": None, "provider": "", "ready": True, "kind": "model", "state": "lazy"}
        for name, doc in models.items():
            slot = self._slots.get(name)
            doc.setdefault("state", "failed" if "error" in doc else "loaded")
            if slot is not None and slot.footprint:
                doc["footprint_bytes"] = slot.footprint
        used = sum(s.footprint for s in self._slots.values() if s.loaded)
        return {"budget_bytes": self.budget, "used_bytes": used,
                "loaded": sorted(n for n, s in self._slots.items() if s.loaded),
                "cold_loads": sum(s.cold_loads for s in self._slots.values()),
                "evictions": sum(s.evictions for s in self._slots.values())}

    def render_prometheus(self) -> bytes:
        """The budget's metrics in the Prometheus text format (appended to the daemon's /metrics)."""
        out: list[str] = []

        def family(name: str, kind: str, text: str, values: dict[str, float]) -> None:
            out.append(f"# HELP edgert_{name} {text}")
            out.append(f"# TYPE edgert_{name} {kind}")
            out.extend(f'edgert_{name}{{model="{m}"}} {v:g}' for m, v in sorted(values.items()))

        slots = dict(self._slots)
        family("cold_loads_total", "counter", "Loads on demand (lazy, or after an unload for room).",
               {n: s.cold_loads for n, s in slots.items()})
        family("cold_load_seconds_total", "counter", "Seconds spent in loads on demand.",
               {n: s.cold_seconds for n, s in slots.items()})
        family("evictions_total", "counter", "Unloads to make room under the memory budget.",
               {n: s.evictions for n, s in slots.items()})
        family("model_footprint_bytes", "gauge", "Measured memory of each loaded model (RSS growth at load).",
               {n: s.footprint for n, s in slots.items() if s.loaded})
        used = sum(s.footprint for s in slots.values() if s.loaded)
        out += ["# HELP edgert_memory_budget_bytes The memory budget for loaded models (0: none).",
                "# TYPE edgert_memory_budget_bytes gauge", f"edgert_memory_budget_bytes {self.budget}",
                "# HELP edgert_memory_budget_used_bytes Sum of the loaded models' measured footprints.",
                "# TYPE edgert_memory_budget_used_bytes gauge", f"edgert_memory_budget_used_bytes {used}"]
        return ("\n".join(out) + "\n").encode()


_PINNED_HINT = "raise [daemon] memory_budget_mb, or set pin = false on some models"


def _pinned_text(source: str, budget: int, pinned: list[tuple[str, int]], how: str) -> str:
    listed = ", ".join(f"{n} {mb(b)}" for n, b in pinned)
    return (f"{source}: daemon.memory_budget_mb = {budget / MIB:g} is too small for the pinned models, "
            f"which {how} {mb(sum(b for _, b in pinned))} ({listed})")


def _measure(model: Any, before: int | None, lower: int) -> int:
    """Run ``model`` a few times (so its arena grows), then read the resident-set growth since ``before``."""
    from edgert.engine.served import warm_up

    try:
        warm_up(model, MEASURE_RUNS)
    except EdgertError:
        pass  # the health check, next, says why it cannot run
    return footprint_of(before, resident_bytes(), lower)
