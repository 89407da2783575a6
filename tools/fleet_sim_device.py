"""Simulated devices for tools/fleet_sim.py: the real updater and sync code on a shared runtime stand-in.

Each :class:`SimDevice` is one device as the daemon builds it (``edgert.device.daemon``), minus the HTTP
and socket servers:

- its own keys (``open_keystore(create=True)``: X25519 wrap key and Ed25519 key made for it), its own
  encrypted store with the base version imported, its own state dir (spool, nonces, TUF cache, updater
  state), its own registration in the fleet directory (``add_device``), and the fleet's TUF root and
  command key installed as provisioning installs them;
- the real :class:`~edgert.device.sync.SyncService` (its own MQTT connection, retained status with a last
  will, SQLite spool for events) and the real :class:`~edgert.device.updater.DeviceUpdater` routed on it
  (TUF over MQTT, chunked download, key record, ``store.install``, then the Deployer);
- the real :class:`~edgert.device.deployer.Deployer` (floor, load, health check, swap, commit) over
  :class:`SimTarget`, a ServingTarget that only records what serves.

What is shared per process, because it does not change what a device does on the wire or on disk:
the :class:`~edgert.runtime.Runtime`, one asyncio loop for all Deployers, one log ring for
``collect-logs``, the fleet's command public key, and the loaded model of each (model, version,
variant): the first device to deploy a version decrypts it from its own store and loads it (one
onnxruntime session); later devices in the process reuse that session for their load, health check
and swap. Every device still verifies and decrypts the package fully on install (its own store).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert.config import ModelEntry
from edgert.device.deployer import Deployer
from edgert.device.importing import import_plaintext
from edgert.device.logtail import LogRing
from edgert.device.sources import ModelSource
from edgert.device.sync import SyncService
from edgert.device.sync_config import MqttSettings
from edgert.device.updater import DeviceUpdater, UpdaterPaths
from edgert.errors import BackendError, UnknownModelError
from edgert.fleet.fleetdir import FleetDir, add_device
from edgert.security.atomic import ensure_private_dir
from edgert.security.keys import format_public_key
from edgert.security.loader import open_keystore, open_store

__all__ = ["DeviceSpec", "ProcessShared", "SimDevice", "SimSource", "SimTarget"]

log = logging.getLogger("edgert.tools.fleet_sim")

#: Telemetry interval of a simulated device (s): long, so the rollout's messages are what is measured.
SIM_TELEMETRY_INTERVAL_S = 3600.0
#: MQTT reconnect backoff of a simulated device (s).
SIM_RECONNECT_S = (0.2, 5.0)
FINAL_STATES = ("active", "failed", "rolled-back")


@dataclass(frozen=True)
class DeviceSpec:
    """What every simulated device of a run shares: fleet, broker, group, models."""

    fleet_dir: str
    fleet_id: str
    host: str
    port: int
    group: str
    model: str
    base_version: str
    base_model: str
    profile: str = "cpu-generic"
    broken_model: str | None = None  # faulty devices load this instead of a new version


class _Shared:
    """A loaded model shared by the devices of a process: ``close()`` is left to the process."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def close(self) -> None:
        """Nothing: other devices still use the session."""


class _FailsAtRun(_Shared):
    """A model whose every run fails (the stand-in of a build that does not run on this hardware)."""

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """Always fails, as an accelerator fault would."""
        raise BackendError("simulated device fault: the model cannot run on this device")


class ProcessShared:
    """Per-process shared parts: runtime, event loop thread, log ring, loaded models."""

    def __init__(self, profile: str, fleet: FleetDir) -> None:
        from edgert.mqtt.signing import load_public_key
        from edgert.runtime import Runtime

        self.runtime = Runtime(profile)
        # What provisioning installs on every device: the fleet's first root, publisher and command keys.
        self.root, self.publisher = fleet.root_bytes(1), fleet.publisher_public
        self.command_key = load_public_key(str(fleet.command_public_key_path))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sim-loop", daemon=True)
        self.thread.start()
        self.ring = LogRing()
        self.ring.attach()
        self._lock = threading.Lock()
        self._models: dict[tuple[str, ...], Any] = {}
        self.loads = 0

    def model(self, key: tuple[str, ...], load: Callable[[], Any]) -> Any:
        """The shared model for ``key``, loaded by the first caller."""
        with self._lock:
            m = self._models.get(key)
            if m is None:
                m = self._models[key] = load()
                self.loads += 1
        return m

    def close(self) -> None:
        """Stop the loop and close the shared sessions."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        for m in self._models.values():
            m.close()
        self.ring.detach()


class SimSource(ModelSource):
    """The device's store as the Deployer's source; loads come from the process's shared sessions."""

    def __init__(self, shared: ProcessShared, store: Any, spec: DeviceSpec, faulty: bool) -> None:
        super().__init__(shared.runtime, lambda: store)
        self.shared, self.spec, self.faulty = shared, spec, faulty

    def load(self, entry: ModelEntry, version: str, variant: str) -> Any:
        """The shared session of (model, version, variant); a faulty device gets a broken one."""
        if self.faulty and version != self.spec.base_version:
            if self.spec.broken_model:
                broken = self.spec.broken_model
                return _Shared(self.shared.model(("broken", broken, version), lambda: self.runtime.load(
                    Path(broken), name=entry.name, version=version, options=entry.runtime_options())))
            return _FailsAtRun(self.shared.model((entry.name, version, variant),
                                                 lambda: ModelSource.load(self, entry, version, variant)))
        return _Shared(self.shared.model((entry.name, version, variant),
                                         lambda: ModelSource.load(self, entry, version, variant)))


class SimTarget:
    """A ServingTarget that records which model object serves under each name (no requests served)."""

    def __init__(self) -> None:
        self.serving: dict[str, Any] = {}

    def served_version(self, name: str) -> str:
        """The version serving under ``name``."""
        return str(self.get(name).version)

    def get(self, name: str) -> Any:
        """The model serving under ``name``; UnknownModelError if none."""
        try:
            return self.serving[name]
        except KeyError:
            raise UnknownModelError(f"model {name!r} is not served") from None

    def add_model(self, model: Any, config: Any, *, warmup: int = 0) -> None:
        """Serve ``model``."""
        self.serving[model.name] = model

    async def swap(self, name: str, new_model: Any, *, warmup: int = 0) -> None:
        """Replace what serves under ``name``."""
        self.serving[name] = new_model

    def remove(self, name: str) -> None:
        """Stop serving ``name``."""
        self.get(name)
        del self.serving[name]

    def add_cascade(self, config: Any) -> None:
        """Cascades are not simulated."""


def _event_bytes(doc: dict[str, Any]) -> bytes:
    # As edgert.device.daemon._event_bytes (private there): the document on the events channel.
    return json.dumps({"v": 1, "ts": time.time(), **doc}, sort_keys=True, default=str).encode("utf-8")


class SimDevice:
    """One simulated device (see the module docstring); ``start()``/``stop()`` as a daemon's services."""

    def __init__(self, root: Path, device_id: str, spec: DeviceSpec, shared: ProcessShared, fleet: FleetDir,
                 *, faulty: bool = False) -> None:
        self.id, self.spec, self.faulty = device_id, spec, faulty
        self.state = root / device_id
        keys = open_keystore(self.state, create=True)
        self.store = open_store(self.state, keys, extra_publishers=[shared.publisher])
        import_plaintext(self.store, Path(spec.base_model), name=spec.model, version=spec.base_version)
        paths = UpdaterPaths(self.state)  # provisioning: the fleet's TUF root
        ensure_private_dir(paths.tuf)
        paths.root_file.write_bytes(shared.root)
        add_device(fleet, device_id, groups=[spec.group], x25519=format_public_key(keys.wrap_public),
                   replace=True)
        entries = (ModelEntry(spec.model),)
        self.target = SimTarget()
        self.deployer = Deployer(source=SimSource(shared, self.store, spec, faulty), target=self.target,
                                 audit=lambda event, **fields: None, models=lambda: entries)
        self.deployer.loop = shared.loop
        self.deployer.run_threadsafe(self.deployer.boot(list(entries)))
        cfg = MqttSettings.from_dict({
            "host": spec.host, "port": spec.port, "fleet": spec.fleet_id, "device_id": device_id,
            "group": spec.group, "command_key_file": str(fleet.command_public_key_path),
            "telemetry_interval": SIM_TELEMETRY_INTERVAL_S, "reconnect_min": SIM_RECONNECT_S[0],
            "reconnect_max": SIM_RECONNECT_S[1]}, f"fleet_sim:{device_id}")
        self.sync = SyncService(cfg, status_provider=self.status, state_root=self.state,
                                log_tail=shared.ring.tail)
        self.deployer.events.append(lambda doc: self.sync.emit_event(_event_bytes(doc)))
        self.events: list[dict[str, Any]] = []
        self.updater = DeviceUpdater.over_mqtt(
            lambda topic, payload: self.sync.link.publish(topic, payload, qos=1),
            fleet=spec.fleet_id, device=device_id, state_dir=self.state, groups=[spec.group],
            command_key=shared.command_key, store=self.store,
            deployer=self.deployer, emit=self._emit)
        self.sync.add_route(self.updater)

    def _emit(self, doc: dict[str, Any]) -> None:
        self.events.append({"state": doc.get("state"), "t": time.time(), "version": doc.get("version")})
        self.sync.emit_event(_event_bytes(doc))

    def status(self) -> dict[str, Any]:
        """What the daemon's status provider gives SyncService (profile and active versions)."""
        return {"profile": self.spec.profile, "providers": ["CPUExecutionProvider"],
                "models": {self.spec.model: self.store.entry(self.spec.model).active}}

    def start(self) -> None:
        """Connect and follow the fleet."""
        self.sync.start()
        self.updater.start()

    def stop(self) -> None:
        """Stop as the daemon does: the updater first, then sync (graceful offline status)."""
        self.updater.stop()
        self.sync.stop()

    def summary(self) -> dict[str, Any]:
        """Final update state, what serves, what the store says is active, and the event timeline."""
        final = next((e for e in reversed(self.events) if e["state"] in FINAL_STATES), None)
        try:
            served = self.target.served_version(self.spec.model)
        except UnknownModelError:
            served = None
        return {"device": self.id, "faulty": self.faulty, "final": final["state"] if final else None,
                "final_t": final["t"] if final else None,
                "first_t": self.events[0]["t"] if self.events else None,
                "served": served, "active": self.store.entry(self.spec.model).active,
                "connected": self.sync.link.connected.is_set()}
