"""The serving daemon: models -> engine -> OIP HTTP, Unix socket and /metrics, under systemd.

Lifecycle: ``start()`` loads every configured model, starts the listeners and extra services, then
tells systemd READY=1. SIGTERM drains (stop admitting, wait for in-flight up to the deadline) and
stops; SIGHUP re-reads the config and loads/swaps/removes models to match it. A supervision
thread restarts a backend session that hangs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edgert.config import DaemonConfig, ModelEntry, load_config, parse_listen
from edgert.device.compliance import CaptureSink, DaemonAudit, open_capture_sink, open_daemon_audit
from edgert.device.sdnotify import Notifier
from edgert.device.sources import ModelSource, open_store
from edgert.device.supervisor import Supervisor
from edgert.errors import ConfigError, EdgertError
from edgert.serve.http_server import HttpLimits, HttpServer
from edgert.serve.oip_http import OipRouter, metrics_router
from edgert.serve.uds import UdsServer

__all__ = ["Daemon", "Service"]

log = logging.getLogger("edgert.device")

#: Warm-up runs of a new version before it takes traffic.
SWAP_WARMUP_RUNS = 3
#: How long an MQTT activate/rollback command waits for the load, warm-up and swap.
SWAP_TIMEOUT_S = 120.0


class Service(Protocol):
    """An extra service run beside the servers (e.g. MQTT sync); start/stop may be sync or async."""

    def start(self) -> Any:
        """Start the service."""
        ...

    def stop(self) -> Any:
        """Stop the service."""
        ...


async def _call(fn: Callable[[], Any]) -> None:
    result = fn()
    if inspect.isawaitable(result):
        await result


def read_token(path: str) -> str:
    """Read a bearer token file, refusing files other users can read."""
    p = Path(path)
    try:
        st = p.stat()
        if st.st_mode & 0o077:
            raise ConfigError(
                f"token file {p} is readable by other users (mode {oct(st.st_mode & 0o777)})",
                hint=f"chmod 600 {p}",
            )
        token = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read token file {p}: {exc.strerror}") from None
    if len(token) < 16:
        raise ConfigError(
            f"token file {p} holds fewer than 16 characters", hint="use e.g. `openssl rand -hex 32`"
        )
    return token


class Daemon:
    """Serve configured models over OIP HTTP and the Unix socket until stopped."""

    def __init__(
        self,
        config: DaemonConfig,
        *,
        runtime: Any = None,
        services: Sequence[Service] = (),
        store_factory: Callable[[], Any] | None = None,
        notifier: Notifier | None = None,
        config_path: str | os.PathLike[str] | None = None,
        build_sync: bool = True,
    ) -> None:
        from edgert.device.serving import ServingAdapter
        from edgert.engine import Engine
        from edgert.metrics import Metrics

        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.metrics = Metrics()
        self.engine = Engine(self.metrics)
        self.runtime = runtime
        self.services: list[Service] = list(services)
        self.build_sync = build_sync  # False when the caller plugs its own sync service in
        self.notifier = notifier or Notifier()
        self._store_factory = store_factory
        self.backend = ServingAdapter(self)
        self.http: HttpServer | None = None
        self.metrics_http: HttpServer | None = None
        self.uds: UdsServer | None = None
        self.addresses: dict[str, Any] = {}
        self.started_at = time.monotonic()
        self.draining = False
        self.is_ready = False
        self._stop_event: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._supervisor: Supervisor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.source: ModelSource | None = None
        self.audit = DaemonAudit(None)
        self.capture: CaptureSink | None = None
        self.restart_requested = False

    # ---- start -------------------------------------------------------------------------------
    def _build_runtime(self) -> Any:
        from edgert.runtime import Runtime

        return Runtime(profile=self.config.profile)

    def _state_root(self) -> Path:
        from edgert.paths import state_dir

        return state_dir(self.config.state_dir or None)

    def _default_store_factory(self) -> Callable[[], Any]:
        root = self._state_root()
        return lambda: open_store(root)

    def _served_names(self) -> set[str]:
        return {m.name for m in self.config.models} | {c.name for c in self.config.cascades}

    async def _reopen_capture(self) -> None:
        """(Re)read the capture settings; the old sink finishes its queue off the event loop."""
        old, self.capture = self.capture, open_capture_sink(self._state_root(), self._served_names())
        if old is not None:
            await asyncio.to_thread(old.close)

    async def start(self) -> None:
        """Load models, start listeners and services, then report READY=1."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        t0 = time.monotonic()
        if self.runtime is None:
            self.runtime = self._build_runtime()
        self.source = ModelSource(self.runtime, self._store_factory or self._default_store_factory())
        self.audit = open_daemon_audit(self._state_root())
        if self.config.mqtt is not None and self.build_sync:
            self.services.append(self._sync_service())
        await self._load_all(self.config)
        self.capture = open_capture_sink(self._state_root(), self._served_names())
        await self._start_listeners()
        for service in self.services:
            await _call(service.start)
        self._supervisor = Supervisor(self.engine.stalled, self.config.hang_timeout_s, self._restart_hung)
        self._supervisor.start()
        if self.notifier.watchdog_s:
            self._tasks.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_s)))
        self.is_ready = True
        self.notifier.ready(f"serving {len(self.config.models)} models")
        self.audit.event("daemon_start", pid=os.getpid(), config=self.config.source,
                         models=self._served_versions(), capture=self._capture_models())
        log.info(
            "daemon ready",
            extra={
                "ready_ms": round((time.monotonic() - t0) * 1000, 1),
                "models": [m.name for m in self.config.models],
                **self.addresses,
            },
        )

    def _sync_service(self) -> Service:
        """The MQTT sync service for a configured [mqtt] table, with the daemon's command handlers."""
        from contextlib import contextmanager

        from edgert.device.handlers import daemon_handlers
        from edgert.device.sync import SyncService
        from edgert.security.loader import open_audit, open_keystore
        from edgert.security.loader import open_store as open_model_store

        cfg = self.config.mqtt  # parsed once, by load_config
        assert cfg is not None
        root = self._state_root()

        @contextmanager
        def store() -> Any:
            keys = open_keystore(root)
            with open_audit(root, keys) as audit:
                yield open_model_store(root, keys, audit)

        return SyncService(
            cfg,
            status_provider=self.status,
            stats_provider=lambda: self.metrics.snapshot(reset_window=True),
            audit=self.audit.event,
            state_root=root,
            handlers=daemon_handlers(
                models=_EngineModels(self), open_store=store, restart=self.request_restart
            ),
        )

    async def _load_all(self, config: DaemonConfig) -> None:
        from edgert.engine import CascadeConfig

        assert self.source is not None
        for entry in config.models:
            model = self.source.load(entry)
            self.engine.add_model(model, entry.settings)
            self.audit.event("model_load", model=entry.name, version=model.version,
                             source="store" if entry.from_store else "file", provider=model.provider)
        for c in config.cascades:
            self.engine.add_cascade(CascadeConfig(c.name, c.small, c.large, c.rule, c.threshold, c.output))

    async def _start_listeners(self) -> None:
        cfg = self.config
        if cfg.http.listen:
            token = read_token(cfg.http.auth_token_file) if cfg.http.auth_token_file else None
            limits = HttpLimits(
                cfg.http.max_body_bytes,
                cfg.http.max_header_bytes,
                cfg.http.read_timeout_s,
                cfg.http.keepalive_timeout_s,
                cfg.http.max_connections,
            )
            self.http = HttpServer(OipRouter(self.backend, token=token), limits)
            self.addresses["http"] = await self._bind(self.http, cfg.http.listen, "http.listen")
        if cfg.metrics.listen:
            self.metrics_http = HttpServer(metrics_router(self.metrics.render_prometheus))
            self.addresses["metrics"] = await self._bind(
                self.metrics_http, cfg.metrics.listen, "metrics.listen"
            )
        if cfg.socket.path:
            self.uds = UdsServer(self.backend, max_frame_bytes=cfg.socket.max_frame_bytes)
            try:
                await self.uds.start(
                    cfg.socket.path, mode=cfg.socket.mode, owner=cfg.socket.owner, group=cfg.socket.group
                )
            except (OSError, KeyError) as exc:
                raise ConfigError(
                    f"{cfg.source}: socket.path {cfg.socket.path}: cannot listen: {exc}",
                    hint="check the directory exists and is writable, and socket.owner/group",
                ) from None
            self.addresses["socket"] = cfg.socket.path

    async def _bind(self, server: HttpServer, listen: str, key: str) -> str:
        host, port = parse_listen(listen)
        try:
            bound_host, bound_port = await server.start(host, port)
        except OSError as exc:
            raise ConfigError(
                f"{self.config.source}: {key} = {listen!r}: cannot listen: {exc.strerror or exc}",
                hint="is another process using the port? pick another with --http HOST:PORT",
            ) from None
        return f"{bound_host}:{bound_port}"

    async def _watchdog(self, interval: float) -> None:
        # Pinging from the event loop means a stuck loop stops the pings and systemd restarts us.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ---- models ------------------------------------------------------------------------------
    def entry(self, name: str) -> ModelEntry | None:
        """The config entry of model ``name``."""
        return next((m for m in self.config.models if m.name == name), None)

    async def activate(self, name: str, version: str | None = None) -> None:
        """Load ``name`` at ``version`` beside the current one, warm it up, swap atomically."""
        entry = self.entry(name)
        if entry is None:
            from edgert.errors import UnknownModelError

            allowed = ", ".join(m.name for m in self.config.models) or "(none)"
            raise UnknownModelError(
                f"model {name!r} is not in the daemon config (configured: {allowed})",
                hint=f"add a [[models]] entry to {self.config.source} and send SIGHUP",
            )
        assert self.source is not None and self._loop is not None
        source = self.source
        # Loading takes tens of ms (more for big models): keep it off the event loop so serving continues.
        current = {info.name: info.version for info in self.engine.models()}
        try:
            model = await self._loop.run_in_executor(None, lambda: source.load(entry, version))
        except BaseException as exc:
            self._audit_failed_swap(name, version, current.get(name), exc, "load")
            raise
        if name in current:
            try:
                await self.engine.swap(name, model, warmup=SWAP_WARMUP_RUNS)
            except BaseException as exc:
                model.close()
                self._audit_failed_swap(name, model.version, current[name], exc, "warmup")
                raise
            self.audit.event("model_swap", model=name, version=model.version, previous=current[name])
        else:
            self.engine.add_model(model, entry.settings)
            self.audit.event("model_load", model=name, version=model.version,
                             source="store" if entry.from_store else "file", provider=model.provider)
        log.info("model activated", extra={"model": name, "version": model.version})

    def _audit_failed_swap(self, name: str, version: str | None, kept: str | None, exc: BaseException,
                           stage: str) -> None:
        """A failed load or swap: the old version (if any) keeps serving, i.e. an automatic rollback."""
        error = exc.message if isinstance(exc, EdgertError) else type(exc).__name__
        self.audit.event("model_swap_failed", model=name, version=version or "(active)", kept=kept,
                         stage=stage, error=error[:300])

    async def deactivate(self, name: str) -> None:
        """Stop serving ``name``."""
        self.engine.get(name)  # raises the engine's unknown-model error
        self.engine.remove(name)
        self.audit.event("model_unload", model=name)
        log.info("model unloaded", extra={"model": name})

    def _restart_hung(self, name: str) -> None:
        """Called from the supervisor thread: reload the same version and swap it in."""
        if self._loop is None or self.entry(name) is None:
            return
        version = self.engine.get(name).version
        self.audit.event("model_restart", model=name, version=version, reason="hung")
        asyncio.run_coroutine_threadsafe(self.activate(name, version), self._loop)

    # ---- run / stop / reload -----------------------------------------------------------------
    async def run(self, on_ready: Callable[[Daemon], None] | None = None, *, signals: bool = True) -> None:
        """Start, serve until SIGTERM/SIGINT or request_stop() (SIGHUP reloads), then drain and stop.

        ``signals=False`` skips signal handlers (they can only be installed in the main thread).
        """
        try:
            await self.start()
        except BaseException:
            await self.shutdown()
            raise
        if on_ready is not None:
            on_ready(self)
        loop = asyncio.get_running_loop()
        assert self._stop_event is not None
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP) if signals else ()
        for sig in handled:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self._stop_event.wait()
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received", extra={"signal": sig.name})
        if sig == signal.SIGHUP:
            self._tasks.append(asyncio.create_task(self.reload()))
        else:
            self.request_stop()

    def request_stop(self) -> None:
        """Ask ``run()`` to drain and stop (signal-safe)."""
        if self._stop_event is not None:
            self._stop_event.set()

    def request_restart(self) -> None:
        """Drain and stop, then have ``edgert daemon`` re-execute itself (same PID under systemd).

        Thread-safe: called from the MQTT command thread for ``reboot-daemon``.
        """
        self.restart_requested = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.request_stop)

    async def shutdown(self) -> None:
        """Drain in-flight requests up to the deadline, then stop everything."""
        self.notifier.stopping()
        self.draining = True
        self.is_ready = False
        log.info("draining", extra={"deadline_s": self.config.drain_timeout_s})
        try:
            await self.engine.drain(self.config.drain_timeout_s)
        except Exception:
            log.exception("drain failed")
        for service in reversed(self.services):
            try:
                await _call(service.stop)
            except Exception:
                log.exception("service stop failed")
        for server in (self.http, self.metrics_http, self.uds):
            if server is not None:
                await server.stop()
        if self._supervisor is not None:
            self._supervisor.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await asyncio.to_thread(self.engine.close)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
            self.capture = None
        uptime = round(time.monotonic() - self.started_at, 3)
        self.audit.event("daemon_stop", pid=os.getpid(), uptime_s=uptime)
        self.audit.close()
        log.info("daemon stopped")

    async def reload(self) -> None:
        """SIGHUP: re-read the config file; add, swap or remove models to match it."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the daemon was not started from a config file")
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            await self._apply(new)
            await self._reopen_capture()
        except EdgertError as exc:
            self.audit.event("config_reload_failed", config=str(self.config_path), error=exc.message[:300])
            log.error("config reload failed; keeping the running config", extra={"error": str(exc)})
        else:
            self.audit.event("config_reload", config=str(self.config_path), models=self._served_versions(),
                             capture=self._capture_models())
        finally:
            self.notifier.ready("serving (reloaded)")

    async def _apply(self, new: DaemonConfig) -> None:
        from edgert.engine import CascadeConfig

        old_models = {m.name: m for m in self.config.models}
        for c in self.config.cascades:
            self.engine.remove(c.name)
        for name in old_models.keys() - {m.name for m in new.models}:
            self.engine.remove(name)
        changed = [m for m in new.models if old_models.get(m.name) != m]
        self.config = _with_models(self.config, new)
        for entry in changed:
            await self.activate(entry.name, entry.version or None)
        for c in new.cascades:
            self.engine.add_cascade(CascadeConfig(c.name, c.small, c.large, c.rule, c.threshold, c.output))
        if (new.http, new.socket, new.metrics) != (self.config.http, self.config.socket, self.config.metrics):
            log.warning("listener changes take effect after a restart")
        log.info("config reloaded", extra={"models": [m.name for m in new.models]})

    # ---- status ------------------------------------------------------------------------------
    def _served_versions(self) -> dict[str, str]:
        return {info.name: info.version for info in self.engine.models()}

    def _capture_models(self) -> list[str]:
        return sorted(self.capture.writers) if self.capture is not None else []

    def status(self) -> dict[str, Any]:
        """Version, profile, effective providers, active model versions, uptime, listeners."""
        from edgert import __version__

        models = {}
        for info in self.engine.models():
            models[info.name] = {
                "version": info.version,
                "provider": info.provider,
                "ready": info.ready,
                "kind": getattr(info, "kind", "model"),
            }
        profile = getattr(getattr(self.runtime, "profile", None), "name", self.config.profile)
        return {
            "version": __version__,
            "profile": profile,
            "providers": sorted({m["provider"] for m in models.values() if m["provider"]}),
            "models": models,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "ready": self.is_ready and not self.draining,
            "draining": self.draining,
            "listeners": dict(self.addresses),
            "pid": os.getpid(),
        }


def _with_models(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """Keep the running listeners; take models and cascades from the new config."""
    from dataclasses import replace

    return replace(old, models=new.models, cascades=new.cascades)


class _EngineModels:
    """What the MQTT command handlers may do to the serving engine (called from the MQTT thread)."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    def served_version(self, name: str) -> str | None:
        """The version of ``name`` being served, if any."""
        return {info.name: info.version for info in self._daemon.engine.models()}.get(name)

    def swap(self, name: str, version: str) -> None:
        """Load, warm up and swap in ``name`` at ``version`` on the daemon's event loop; wait for it."""
        loop = self._daemon._loop
        if loop is None:
            raise RuntimeError("the daemon is not running")
        asyncio.run_coroutine_threadsafe(self._daemon.activate(name, version), loop).result(SWAP_TIMEOUT_S)
