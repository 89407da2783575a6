"""The Deployer: the one place that changes which model version serves.

Every entry point goes through it: ``edgert models import|activate|rollback``, the OIP HTTP and
Unix-socket repository load/unload, MQTT fleet commands, SIGHUP reload, the hang supervisor, boot,
and (later) the fleet updater. One deployment runs these steps, in order:

1. **floor**: the store's anti-rollback check (:meth:`ModelStore.check_activate`), before any work;
2. **load**: decrypt into memory and load, trying the package's variants in the device profile's
   order until one loads;
3. **health**: warm up on zero inputs (and, when the package carries them, compare with its golden
   outputs); the warm run must finish within the latency bound;
4. **swap**: atomically, beside the serving version, with zero failed requests (the engine's swap);
5. **commit**: the store's active pointer, then the audit record and the event.

On any failure nothing changes: the store and the engine keep the previous version, and the failure
is audited and reported with its reason and stage. Deployments of one model are serialised.

Without an engine (``edgert models activate`` while no daemon runs) steps 1-3 run, the model is
closed, and step 5 commits: a version becomes active only after it has really loaded on this device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgert.config import CascadeEntry, ModelEntry
from edgert.device.health import DEFAULT_MAX_WARM_LATENCY_S, WARMUP_RUNS, Golden, health_check
from edgert.device.lazy import COLD_LOAD, MemoryKeeper
from edgert.errors import BackendError, EdgertError, UnknownModelError
from edgert.profiles import variant_order

__all__ = [
    "DEFAULT_MAX_WARM_LATENCY_S",
    "DEPLOY_TIMEOUT_S",
    "Deployer",
    "Deployment",
    "ServingTarget",
    "Unavailable",
]

log = logging.getLogger("edgert.device.deployer")

#: How long a caller on another thread (MQTT commands) waits for a deployment.
DEPLOY_TIMEOUT_S = 120.0


class ServingTarget(Protocol):
    """Where deployed models serve: the daemon's engine."""

    def served_version(self, name: str) -> str:
        """The version of the model serving under ``name``; raises UnknownModelError."""
        ...

    def get(self, name: str) -> Any:
        """Describe the model or cascade served under ``name``; raises UnknownModelError."""
        ...

    def add_model(self, model: Any, config: Any, *, warmup: int = ...) -> None:
        """Serve a new model."""
        ...

    async def swap(self, name: str, new_model: Any, *, warmup: int = ...) -> None:
        """Replace the served version atomically."""
        ...

    def remove(self, name: str, *, keep_stats: bool = False) -> None:
        """Stop serving ``name`` (``keep_stats``: its counts continue when it loads again)."""
        ...

    def add_cascade(self, config: Any) -> None:
        """Serve a cascade of two served models."""
        ...

    def add_pipeline(self, config: Any) -> None:
        """Serve a pipeline over served models and cascades (its stage chain checked)."""
        ...


@dataclass(frozen=True)
class Deployment:
    """What a successful deployment did."""

    model: str
    version: str
    previous: str | None
    variant: str
    variant_reason: str
    provider: str
    changed: bool  # False when that version was already serving and active
    pruned: tuple[str, ...] = ()


@dataclass(frozen=True)
class Unavailable:
    """A configured model that serves no version, and why."""

    model: str
    version: str | None
    reason: str


@dataclass
class _ModelState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    variant: str = ""
    variant_reason: str = ""


def _error_text(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, EdgertError) else f"{type(exc).__name__}: {exc}"
    return text[:300]


class Deployer:
    """Changes what serves; see the module docstring. Runs on the daemon's event loop."""

    def __init__(
        self,
        *,
        source: Any,
        target: ServingTarget | None,
        audit: Callable[..., None],
        models: Callable[[], Sequence[ModelEntry]],
        cascades: Callable[[], Sequence[CascadeEntry]] = tuple,
        preferred_variants: Sequence[str] = (),
        max_warm_latency_s: float = DEFAULT_MAX_WARM_LATENCY_S,
        source_name: str = "<config>",
        shadows: dict[str, Any] | None = None,
        pipelines: Callable[[], Sequence[Any]] = tuple,
        memory_budget_mb: float = 0.0,
    ) -> None:
        self.source = source  # edgert.device.sources.ModelSource
        self.target = target
        self.audit = audit
        self._models = models
        self._cascades = cascades
        self.preferred_variants = tuple(preferred_variants)
        self.max_warm_latency_s = max_warm_latency_s
        self.source_name = source_name  # the config file, for error messages
        self.events: list[Callable[[dict[str, Any]], None]] = []
        self.unavailable: dict[str, Unavailable] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._state: dict[str, _ModelState] = {}
        #: Candidates in shadow evaluation by model name (ShadowRunner); the serving adapter reads it.
        self.shadows: dict[str, Any] = shadows if shadows is not None else {}
        self._pipelines = pipelines  # [[pipelines]] configs (edgert.engine.pipeline_config.PipelineConfig)
        #: Lazy loads and the memory budget (edgert.device.lazy); None without an engine.
        self.memory = MemoryKeeper(self, int(memory_budget_mb * (1 << 20))) if target is not None else None

    # ---- lookups -----------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry:
        """The config entry of ``name``; UnknownModelError if it is not configured."""
        for m in self._models():
            if m.name == name:
                return m
        allowed = ", ".join(m.name for m in self._models()) or "(none)"
        raise UnknownModelError(f"model {name!r} is not in the daemon config (configured: {allowed})",
                                hint="add a [[models]] entry to the daemon config and send SIGHUP")

    def cascade(self, name: str) -> CascadeEntry | None:
        """The config entry of cascade ``name``, if there is one."""
        return next((c for c in self._cascades() if c.name == name), None)

    def pipeline(self, name: str) -> Any:
        """The config of pipeline ``name``, if there is one."""
        return next((p for p in self._pipelines() if p.name == name), None)

    def _restore_pipelines(self, *, strict: bool = True) -> None:
        """Serve the configured pipelines whose members all serve; a chain that does not fit is audited,
        and raised when ``strict`` (boot, reload, repository load; not when a member model comes back)."""
        if self.target is None:
            return
        refused: list[EdgertError] = []
        for p in self._pipelines():
            if not self._is_served(p.name) and all(self._is_served(m) for m in p.members):
                try:
                    self.target.add_pipeline(p)  # ConfigError naming the stage when the chain does not fit
                except EdgertError as exc:  # the others still serve; the first refusal is raised below
                    refused.append(exc)
                    self.audit("pipeline_refused", model=p.name, error=_error_text(exc))
                    log.error("pipeline refused", extra={"model": p.name, "error": _error_text(exc)})
                    continue
                self.audit("model_load", model=p.name, kind="pipeline", origin="deployer")
        if refused and strict:
            raise refused[0]

    def served_variant(self, name: str) -> tuple[str, str]:
        """(variant, why) of the version serving under ``name`` ("", "") if unknown."""
        st = self._state.get(name)
        return (st.variant, st.variant_reason) if st else ("", "")

    def entries(self) -> Sequence[ModelEntry]:
        """The configured models."""
        return self._models()

    def cascade_entries(self) -> Sequence[CascadeEntry]:
        """The configured cascades."""
        return self._cascades()

    def serving(self, name: str) -> bool:
        """True when a version of model ``name`` serves."""
        return self._served(name) is not None

    def deploying(self, name: str) -> bool:
        """True while a deployment or unload of ``name`` runs."""
        st = self._state.get(name)
        return st is not None and st.lock.locked()

    def _served(self, name: str) -> str | None:
        if self.target is None:
            return None
        try:
            return self.target.served_version(name)
        except UnknownModelError:
            return None

    def _is_served(self, name: str) -> bool:
        """True when a model or cascade serves under ``name``."""
        if self.target is None:
            return False
        try:
            self.target.get(name)
        except UnknownModelError:
            return False
        return True

    def _st(self, name: str) -> _ModelState:
        st = self._state.get(name)
        if st is None:
            st = self._state[name] = _ModelState()
        return st

    # ---- the one path ------------------------------------------------------------------------
    async def deploy(self, name: str, version: str | None = None, *, allow_downgrade: bool = False,
                     origin: str = "api", reason: str = "activate", force_reload: bool = False,
                     golden: Golden | None = None) -> Deployment:
        """Serve ``name`` at ``version`` (None: the store's active one); see the module docstring.

        ``golden`` (inputs, outputs) overrides the package's own for the health check (the fleet's TUF
        targets metadata carries them, signed).
        """
        entry = self.entry(name)
        async with self._st(name).lock:
            return await self._deploy_locked(entry, version, allow_downgrade=allow_downgrade, origin=origin,
                                             reason=reason, force_reload=force_reload, golden=golden)

    async def _deploy_locked(self, entry: ModelEntry, version: str | None, *, allow_downgrade: bool,
                             origin: str, reason: str, force_reload: bool,
                             golden: Golden | None = None) -> Deployment:
        name = entry.name
        served = self._served(name)
        stage = "floor"
        try:
            version = self.source.resolve_version(entry, version)
            active = self.source.active_version(entry)
            if served == version and active == version and not force_reload:
                variant, why = self.served_variant(name)
                return Deployment(name, version, served, variant, why, "", changed=False)
            if entry.from_store:
                self.source.check_activate(entry, version, allow_downgrade=allow_downgrade)
            stage = "load"
            model, variant, why = await self._load_within_budget(entry, version)
            stage = "health"
            try:
                await asyncio.to_thread(health_check, model, golden or self.source.golden(entry, version),
                                        self.max_warm_latency_s)
                stage = "swap"
                await self._swap(entry, model, served)
            except BaseException:
                if self.target is None or stage != "swap":
                    await asyncio.to_thread(model.close)
                raise
            stage = "commit"
            previous = active if active is not None else served
            pruned = self.source.commit(entry, version, allow_downgrade=allow_downgrade)
        except BaseException as exc:
            self._failed(name, version, served, stage, exc, origin, reason)
            raise
        provider = str(getattr(model, "provider", ""))
        if self.target is None:
            await asyncio.to_thread(model.close)
        st = self._st(name)
        st.variant, st.variant_reason = variant, why
        self.unavailable.pop(name, None)
        if self.memory is not None:
            self.memory.settled(name, ok=True)
        if reason == COLD_LOAD:  # a load on demand changes no version: counted in metrics, not audited
            return Deployment(name, version, previous, variant, why, provider, changed=True)
        done = Deployment(name, version, previous, variant, why, provider, changed=True, pruned=tuple(pruned))
        self.audit("model_deployed", model=name, version=version, previous=previous, variant=variant,
                   provider=provider, origin=origin, reason=reason, pruned=list(pruned))
        self._event({"event": "model_deployed", "model": name, "version": version, "previous": previous,
                     "variant": variant, "provider": provider, "origin": origin, "reason": reason})
        log.info("model deployed", extra={"model": name, "version": version, "previous": previous,
                                          "variant": variant, "origin": origin, "reason": reason})
        return done

    async def _load(self, entry: ModelEntry, version: str) -> tuple[Any, str, str]:
        """Load the first variant, in the profile's order, that loads; (model, variant, why)."""
        available = self.source.variants(entry, version)
        tried: list[str] = []
        for variant, why in variant_order(self.preferred_variants, available):
            try:
                model = await asyncio.to_thread(self.source.load, entry, version, variant)
            except EdgertError as exc:
                tried.append(f"{variant}: {exc.message[:120]}")
                log.warning("variant did not load; trying the next", extra={
                    "model": entry.name, "version": version, "variant": variant, "error": exc.message[:200]})
                continue
            if tried:
                why = f"{why}; before it, {'; '.join(tried)}"
            return model, variant, why
        raise BackendError(f"no variant of {entry.name} {version} loads on this device ({'; '.join(tried)})",
                           hint="'edgert doctor' shows the providers; ship a variant this profile runs")

    async def _load_within_budget(self, entry: ModelEntry, version: str) -> tuple[Any, str, str]:
        """:meth:`_load`, under the memory budget when there is one (room made first, footprint measured)."""
        if self.memory is None or self.memory.budget <= 0:
            return await self._load(entry, version)
        return await self.memory.measured_load(entry, version, self._load)

    async def _swap(self, entry: ModelEntry, model: Any, served: str | None) -> None:
        if self.target is None:
            return
        if served is not None:
            await self.target.swap(entry.name, model, warmup=WARMUP_RUNS)
        else:
            await asyncio.to_thread(self.target.add_model, model, entry.settings, warmup=WARMUP_RUNS)
            self._restore_cascades(entry.name)

    def _restore_cascades(self, member: str) -> None:
        """Serve again the configured cascades whose members both serve (after a member came back)."""
        if self.target is None:
            return
        for c in self._cascades():
            if member in (c.small, c.large) and not self._is_served(c.name) \
                    and self._served(c.small) and self._served(c.large):
                self.target.add_cascade(_cascade_config(c))
        self._restore_pipelines(strict=False)  # the member serves; a refused pipeline is audited

    def _failed(self, name: str, version: str | None, kept: str | None, stage: str, exc: BaseException,
                origin: str, reason: str) -> None:
        if self.memory is not None:
            self.memory.settled(name, ok=False)
        error = _error_text(exc)
        self.audit("model_deploy_failed", model=name, version=version or "(active)", kept=kept, stage=stage,
                   origin=origin, reason=reason, error=error)
        self._event({"event": "model_deploy_failed", "model": name, "version": version, "kept": kept,
                     "stage": stage, "origin": origin, "error": error})
        log.error("deployment failed; nothing changed", extra={
            "model": name, "version": version, "kept": kept, "stage": stage, "error": error})

    def _event(self, doc: dict[str, Any]) -> None:
        for sink in self.events:
            try:
                sink(doc)
            except Exception:  # an event sink must never fail a deployment
                log.exception("event sink failed", extra={"event": doc.get("event")})

    # ---- operations built on deploy ------------------------------------------------------------
    async def rollback(self, name: str, *, origin: str = "api") -> Deployment:
        """Serve the store's previous version (swap active and previous); anti-rollback is waived."""
        entry = self.entry(name)
        previous = self.source.previous_version(entry)
        return await self.deploy(name, previous, allow_downgrade=True, origin=origin, reason="rollback")

    async def load(self, name: str, version: str | None = None, *, allow_downgrade: bool = False,
                   origin: str = "api") -> None:
        """Repository load: a configured cascade or pipeline is served again; a model is deployed."""
        pipeline = self.pipeline(name)
        if pipeline is not None and self.target is not None:
            for member in pipeline.members:
                if not self._is_served(member):
                    await self.load(member, origin=origin)
            self._restore_pipelines()
            return
        cascade = self.cascade(name)
        if cascade is not None and self.target is not None:
            for member in (cascade.small, cascade.large):
                if self._served(member) is None:
                    await self.deploy(member, origin=origin, reason="load")
            if not self._is_served(name):
                self.target.add_cascade(_cascade_config(cascade))
                self.audit("model_load", model=name, kind="cascade", origin=origin)
            return
        await self.deploy(name, version, allow_downgrade=allow_downgrade, origin=origin, reason="load")

    async def unload(self, name: str, *, origin: str = "api") -> None:
        """Stop serving ``name`` (the store is unchanged: it still says what serves when loaded)."""
        if self.target is None:
            return
        async with self._st(name).lock:
            cascade = self.cascade(name)
            virtual = cascade or self.pipeline(name)
            version = self.target.get(name).versions[0] if virtual else self.target.served_version(name)
            self.target.remove(name)  # UnknownModelError when not served
            if self.memory is not None:
                self.memory.unloaded(name)
        self.audit("model_unload", model=name, version=version, origin=origin)
        self._event({"event": "model_unload", "model": name, "version": version, "origin": origin})

    def unload_for_room(self, name: str) -> None:
        """Unload idle ``name`` for the memory budget (lazy.MemoryKeeper decides); it loads again on demand.

        The engine stops admitting to it at once and closes it when its admitted requests finish.
        """
        if self.target is not None:
            self.target.remove(name, keep_stats=True)  # counts continue when it loads again

    def mark_unavailable(self, entry: ModelEntry, version: str | None, exc: BaseException) -> None:
        """Record that ``entry`` serves no version (a failed load on demand), audited with the reason."""
        self._mark_unavailable(entry, version, exc)

    async def restart(self, name: str, *, origin: str = "supervisor") -> Deployment:
        """Load the serving version again and swap it in (a hung session)."""
        version = self._served(name)
        return await self.deploy(name, version, origin=origin, reason="hung", force_reload=True)

    async def boot(self, entries: Sequence[ModelEntry], *, origin: str = "boot") -> dict[str, Unavailable]:
        """Serve ``entries``; fall back to the previous version when the active one fails.

        A model with no servable version is left unready and reported; the others serve. Configured
        cascades whose members serve are (re-)added. Also used by SIGHUP reload for changed entries.
        Lazy models are not loaded here (edgert.device.lazy), and a memory budget too small for the
        pinned models is refused (ConfigError).
        """
        if self.memory is not None:
            entries = self.memory.before_boot(entries, self.source_name)
        for entry in entries:
            try:
                await self.deploy(entry.name, entry.version or None, origin=origin, reason="start",
                                  force_reload=origin != "boot")
                continue
            except EdgertError as exc:
                first = exc
            if self._served(entry.name) is not None:
                continue  # a reload that failed: the serving version keeps serving (already audited)
            failed = self._try_version(entry)
            fallback = self.source.fallback_version(entry, failed) if entry.from_store else None
            if failed and entry.from_store:
                self.source.mark_failed(entry, failed, _error_text(first))
            if fallback is not None:
                try:
                    done = await self.deploy(entry.name, fallback, allow_downgrade=True, origin=origin,
                                             reason="fallback")
                except EdgertError as exc:
                    first = exc
                else:
                    self.audit("model_boot_fallback", model=entry.name, failed=failed, version=done.version,
                               error=_error_text(first))
                    self._event({"event": "model_boot_fallback", "model": entry.name, "failed": failed,
                                 "version": done.version, "error": _error_text(first)})
                    continue
            self._mark_unavailable(entry, failed, first)
        for c in self._cascades():
            if self.target is not None and self._served(c.small) and self._served(c.large) \
                    and not self._is_served(c.name):
                self.target.add_cascade(_cascade_config(c))
        self._restore_pipelines()
        if self.memory is not None:
            self.memory.after_boot(self.source_name)
        return dict(self.unavailable)

    def _try_version(self, entry: ModelEntry) -> str | None:
        try:
            return str(self.source.resolve_version(entry, entry.version or None))
        except EdgertError:
            return None

    def _mark_unavailable(self, entry: ModelEntry, version: str | None, exc: BaseException) -> None:
        item = Unavailable(entry.name, version, _error_text(exc))
        self.unavailable[entry.name] = item
        self.audit("model_unavailable", model=entry.name, version=version, error=item.reason)
        self._event({"event": "model_unavailable", "model": entry.name, "version": version,
                     "error": item.reason})
        log.error("model has no servable version; it is not served",
                  extra={"model": entry.name, "version": version, "error": item.reason})

    # ---- shadow evaluation (edgert.device.shadow) -------------------------------------------------
    async def start_shadow(self, name: str, version: str, percent: float, *, origin: str = "updater",
                           rollout: str = "", allow_downgrade: bool = False) -> Any:
        """Load ``version`` through the floor, load and health steps and run it in shadow on ``percent``
        of the requests to ``name``; it never serves a caller and the store is not committed."""
        from edgert.device.shadow import ShadowRunner

        entry = self.entry(name)
        if self.target is None:
            raise EdgertError("shadow evaluation needs the running daemon", hint="start the daemon")
        async with self._st(name).lock:
            served, stage = self._served(name), "floor"
            try:
                version = self.source.resolve_version(entry, version)
                if entry.from_store:
                    self.source.check_activate(entry, version, allow_downgrade=allow_downgrade)
                stage = "load"
                model, variant, _ = await self._load(entry, version)
                stage = "health"
                try:
                    await asyncio.to_thread(health_check, model, self.source.golden(entry, version),
                                            self.max_warm_latency_s)
                    runner = ShadowRunner(model, name=name, version=version, percent=percent, rollout=rollout,
                                          variant=variant)
                except BaseException:
                    await asyncio.to_thread(model.close)
                    raise
            except BaseException as exc:
                self._failed(name, version, served, stage, exc, origin, "shadow")
                raise
            runner.start()
            old, self.shadows[name] = self.shadows.get(name), runner
        if old is not None:
            await asyncio.to_thread(old.close)
        self.audit("model_shadow_started", model=name, version=version, serving=served, percent=percent,
                   variant=variant, origin=origin, rollout=rollout)
        self._event({"event": "model_shadow_started", "model": name, "version": version, "serving": served,
                     "percent": percent, "variant": variant, "origin": origin})
        return runner

    async def stop_shadow(self, name: str, *, origin: str = "updater") -> dict[str, Any] | None:
        """Stop the shadow evaluation of ``name``, if any; its final numbers (None when none ran)."""
        runner = self.shadows.pop(name, None)
        if runner is None:
            return None
        await asyncio.to_thread(runner.close)
        snap: dict[str, Any] = runner.snapshot()
        self.audit("model_shadow_stopped", model=name, version=runner.version, origin=origin,
                   samples=snap["samples"], errors=snap["errors"], agreement=snap["agreement"],
                   latency_ratio=snap["latency_ratio"])
        return snap

    # ---- other threads --------------------------------------------------------------------------
    def run_threadsafe(self, coro: Coroutine[Any, Any, Any], timeout: float = DEPLOY_TIMEOUT_S) -> Any:
        """Run a deployment coroutine on the daemon's loop from another thread; wait for its result."""
        loop = self.loop
        if loop is None or loop.is_closed():
            coro.close()
            raise EdgertError("the daemon is not running", hint="start it, or retry once it is ready")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


def _cascade_config(c: CascadeEntry) -> Any:
    from edgert.engine import CascadeConfig

    return CascadeConfig(c.name, c.small, c.large, c.rule, c.threshold, c.output)

