"""The serving daemon: models -> engine -> OIP HTTP, Unix socket and /metrics, under systemd.

Lifecycle: ``start()`` loads every configured model, starts the listeners and extra services, then
tells systemd READY=1. SIGTERM drains (stop admitting, wait for in-flight up to the deadline) and
stops; SIGHUP re-reads the config and loads/swaps/removes models to match it. A supervision
thread restarts a backend session that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edgert.config import DaemonConfig, ModelEntry, is_loopback, load_config, parse_listen
from edgert.device.compliance import CaptureSink, DaemonAudit, open_capture_sink, open_daemon_audit
from edgert.device.deployer import Deployer
from edgert.device.drift import DriftWatch
from edgert.device.sdnotify import Notifier
from edgert.device.sources import ModelSource, open_store
from edgert.device.supervisor import Supervisor
from edgert.errors import ConfigError, EdgertError, UnknownModelError
from edgert.serve import memory as serve_memory
from edgert.serve.http_server import HttpServer
from edgert.serve.oip_http import OipRouter, metrics_router
from edgert.serve.uds import UdsServer

__all__ = ["Daemon", "Service"]

log = logging.getLogger("edgert.device")



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


#: How to move each listener elsewhere (command-line option and config key).
_OTHER_PORT_HINT = {
    "http.listen": "pick another with --http HOST:PORT (or [http] listen)",
    "metrics.listen": "pick another with --metrics HOST:PORT on `edgert demo`, or [metrics] listen "
                      '(listen = "" turns it off)',
}


def check_http_exposure(listen: str, token_file: str, source: str) -> None:
    """Refuse to serve a non-loopback address without a bearer token, whoever set the address.

    The config parser applies the same rule to the file; this catches ``--http`` overrides
    (``edgert daemon --http``, ``edgert demo --http``) just before the listener binds.
    """
    host, _ = parse_listen(listen)
    if not token_file and not is_loopback(host):
        raise ConfigError(
            f"{source}: refusing to serve HTTP on the non-loopback address {listen!r} without a bearer "
            "token: anyone on the network could call (and load or unload) the models",
            hint="bind 127.0.0.1 (e.g. --http 127.0.0.1:8000), or run `edgert daemon` with "
                 "http.auth_token_file set to a 0600 file holding a token",
        )


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
        from edgert.metrics.timing import Tracer

        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.metrics = Metrics()
        self.engine = Engine(self.metrics)
        self.runtime = runtime
        self.services: list[Service] = list(services)
        self.build_sync = build_sync  # False when the caller plugs its own sync service in
        self.notifier = notifier or Notifier()
        self._store_factory = store_factory
        self.shadows: dict[str, Any] = {}  # Deployer.shadows: candidates in shadow evaluation (ShadowRunner)
        self.backend = ServingAdapter(self, Tracer(config.slow_request_ms))
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
        self.deployer: Deployer | None = None
        self.audit = DaemonAudit(None)
        self.capture: CaptureSink | None = None
        self.drift: DriftWatch | None = DriftWatch.for_daemon(self, self._state_root)  # docs/drift.md
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
        return lambda: open_store(root, self.audit.event, self.config.trusted_publishers)

    def _served_names(self) -> set[str]:
        return {m.name for m in self.config.models} | {c.name for c in self.config.cascades} \
            | {p.name for p in self.config.pipelines}

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
        serve_memory.tune_allocator()  # large requests reuse heap memory instead of faulting it in anew
        if self.config.http.listen:  # before any work: a refused address must not load models first
            check_http_exposure(self.config.http.listen, self.config.http.auth_token_file, self.config.source)
        if self.runtime is None:
            self.runtime = self._build_runtime()
        self.audit = open_daemon_audit(self._state_root())
        self.source = ModelSource(self.runtime, self._store_factory or self._default_store_factory())
        self.deployer = self._build_deployer(self.source)
        if self.config.mqtt is not None and self.build_sync:
            self.services.append(self._sync_service())
        await self.deployer.boot(self.config.models)
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
        from edgert.device.handlers import daemon_handlers
        from edgert.device.sync import SyncService

        cfg = self.config.mqtt  # parsed once, by load_config
        assert cfg is not None and self.deployer is not None
        sync = SyncService(
            cfg,
            status_provider=self.status,
            stats_provider=lambda: self.metrics.snapshot(reset_window=True),
            audit=self.audit.event,
            state_root=self._state_root(),
            handlers=daemon_handlers(deployer=self.deployer, restart=self.request_restart),
            audit_head=self.audit.head,
        )
        self.deployer.events.append(lambda doc: sync.emit_event(_event_bytes(doc)))
        if self.drift is not None:
            self.drift.events.append(lambda doc: sync.emit_event(_event_bytes(doc)))
        updater = self._updater(sync)
        if updater is not None:
            sync.add_route(updater)
            self.services.append(updater)  # started after sync, stopped before it
        return sync

    def _updater(self, sync: Any) -> Any:
        """The fleet model updater, when the device has a command key and a TUF root to trust."""
        from edgert.device.updater import DeviceUpdater, UpdaterPaths
        from edgert.mqtt.signing import load_public_key

        cfg = self.config.mqtt
        assert cfg is not None and self.deployer is not None and self.source is not None
        paths = UpdaterPaths(self._state_root())
        if not cfg.sync.command_key_file or not paths.root_file.is_file():
            log.info("fleet model updates off: they need [mqtt] command_key_file and the fleet's TUF root "
                     "at %s (installed at provisioning)", paths.root_file)
            return None
        return DeviceUpdater.over_mqtt(
            lambda topic, payload: sync.link.publish(topic, payload, qos=1),
            fleet=cfg.sync.fleet, device=cfg.sync.device_id, state_dir=self._state_root(),
            repository_url=cfg.sync.repository_url,
            groups=[cfg.sync.group] if cfg.sync.group else [],
            command_key=load_public_key(cfg.sync.command_key_file),
            store=self.source.store, deployer=self.deployer,
            emit=lambda doc: sync.emit_event(_event_bytes(doc)))

    def _build_deployer(self, source: ModelSource) -> Deployer:
        profile = getattr(self.runtime, "profile", None)
        deployer = Deployer(
            source=source,
            target=self.engine,
            audit=self.audit.event,
            models=lambda: self.config.models,
            cascades=lambda: self.config.cascades,
            preferred_variants=tuple(getattr(profile, "variants", ()) or ()),
            shadows=self.shadows,
            pipelines=lambda: self.config.pipelines,
            memory_budget_mb=self.config.memory_budget_mb, source_name=self.config.source,
        )
        deployer.loop = self._loop
        return deployer

    async def _start_listeners(self) -> None:
        cfg = self.config
        if cfg.http.listen:
            token = read_token(cfg.http.auth_token_file) if cfg.http.auth_token_file else None
            self.http = HttpServer(OipRouter(self.backend, token=token), cfg.http.limits)
            self.addresses["http"] = await self._bind(self.http, cfg.http.listen, "http.listen")
        if cfg.metrics.listen:
            self.metrics_http = HttpServer(metrics_router(self._render_metrics))
            self.addresses["metrics"] = await self._bind(
                self.metrics_http, cfg.metrics.listen, "metrics.listen"
            )
        if cfg.socket.path:
            self.uds = UdsServer(self.backend, cfg.socket.limits)
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

    def _render_metrics(self) -> bytes:
        """/metrics: the registry's, then the memory budget's (cold loads, evictions, footprints)."""
        memory = self.deployer.memory if self.deployer is not None else None
        return self.metrics.render_prometheus() + (memory.render_prometheus() if memory is not None else b"")

    async def _bind(self, server: HttpServer, listen: str, key: str) -> str:
        host, port = parse_listen(listen)
        try:
            bound_host, bound_port = await server.start(host, port)
        except OSError as exc:
            raise ConfigError(
                f"{self.config.source}: {key} = {listen!r}: cannot listen: {exc.strerror or exc}",
                hint=f"is another process using the port? {_OTHER_PORT_HINT.get(key, 'pick another port')}",
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

    def _restart_hung(self, name: str) -> None:
        """Called from the supervisor thread: the Deployer reloads the serving version and swaps it in."""
        deployer = self.deployer
        if deployer is None or deployer.loop is None or self.entry(name) is None:
            return
        future = asyncio.run_coroutine_threadsafe(deployer.restart(name), deployer.loop)
        # The Deployer audits and reports a failed restart; retrieve it so asyncio does not log it again.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

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
        for name in list(self.shadows):
            if self.deployer is not None:
                await self.deployer.stop_shadow(name, origin="shutdown")
        await asyncio.to_thread(self.engine.close)
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
            self.capture = None
        if self.drift is not None:
            await asyncio.to_thread(self.drift.close)
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
            if self.drift is not None:
                self.drift.reset()  # new [models.drift] settings: fresh windows
        except EdgertError as exc:
            self.audit.event("config_reload_failed", config=str(self.config_path), error=exc.message[:300])
            log.error("config reload failed; keeping the running config", extra={"error": str(exc)})
        else:
            self.audit.event("config_reload", config=str(self.config_path), models=self._served_versions(),
                             capture=self._capture_models())
        finally:
            self.notifier.ready("serving (reloaded)")

    async def _apply(self, new: DaemonConfig) -> None:
        """Serve what ``new`` configures, through the Deployer; one model failing does not stop the rest."""
        assert self.deployer is not None
        old_models = {m.name: m for m in self.config.models}
        for p in self.config.pipelines:
            with contextlib.suppress(UnknownModelError):
                self.engine.remove(p.name)
        for c in self.config.cascades:
            with contextlib.suppress(UnknownModelError):
                self.engine.remove(c.name)
        for name in old_models.keys() - {m.name for m in new.models}:
            with contextlib.suppress(UnknownModelError):
                await self.deployer.unload(name, origin="reload")
            self.deployer.unavailable.pop(name, None)
        unavailable = self.deployer.unavailable
        changed = [m for m in new.models if old_models.get(m.name) != m or m.name in unavailable]
        self.config = _with_models(self.config, new)
        await self.deployer.boot(changed, origin="reload")
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

        models: dict[str, dict[str, Any]] = {}
        for info in self.engine.models():
            variant, why = self.deployer.served_variant(info.name) if self.deployer else ("", "")
            models[info.name] = {
                "version": info.version,
                "provider": info.provider,
                "ready": info.ready,
                "kind": getattr(info, "kind", "model"),
                **({"variant": variant, "variant_reason": why} if variant else {}),
            }
            drift = self.drift.status(info.name) if self.drift is not None else None
            if drift is not None:
                models[info.name]["drift"] = drift
        for name, item in (self.deployer.unavailable if self.deployer else {}).items():
            models[name] = {"version": None, "provider": "", "ready": False, "kind": "model",
                            "failed_version": item.version, "error": item.reason}
        memory = self.deployer.memory if self.deployer is not None else None
        budget = memory.annotate(models) if memory is not None else None  # lazy/loaded/failed, footprints
        profile = getattr(getattr(self.runtime, "profile", None), "name", self.config.profile)
        return {
            **({"memory": budget} if budget is not None else {}),
            "version": __version__,
            "profile": profile,
            "providers": sorted({m["provider"] for m in models.values() if m["provider"]}),
            "models": models,
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "ready": self.is_ready and not self.draining,
            "draining": self.draining,
            "listeners": dict(self.addresses),
            "pid": os.getpid(),
            "audit": self.audit.status(),  # the signed head: the fleet keeps a copy (docs/security.md)
        }


def _with_models(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """Keep the running listeners; take models and cascades from the new config."""
    from dataclasses import replace

    return replace(old, models=new.models, cascades=new.cascades, pipelines=new.pipelines)


def _event_bytes(doc: dict[str, Any]) -> bytes:
    """A Deployer event as the JSON document the MQTT ``events`` channel carries."""
    import json

    return json.dumps({"v": 1, "ts": time.time(), **doc}, sort_keys=True, default=str).encode("utf-8")
