"""The fleet controller: ingests device status/telemetry/events into the fleet db and runs rollouts.

:class:`Controller` holds the policy and no I/O of its own: messages come in through
:meth:`Controller.handle_message`, time through ``now`` arguments, and desired-state documents go out
through the ``publish`` callable it is given. :class:`ControllerService` is the thin shell that wires
it to an :class:`~edgert.mqtt.client.MqttLink` and a loop. Other parts that share the controller's
MQTT connection (the repository responder, ``edgert.mqtt.repo_server``) attach as an
:class:`Attachment`: they name their topic filters and get each matching message plus ``publish``.

Only the holder of the fleet's lease (db row ``leases``) acts on rollouts; every replica ingests.
Operator commands (:func:`create_rollout`, :func:`request_rollback`, :func:`set_paused`) only write
the db; the acting controller carries them out on its next tick.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgert.errors import ConfigError, SyncError
from edgert.fleet import docs_sign
from edgert.fleet.db import FleetDB, FleetStateError, Rollout
from edgert.fleet.planner import (
    DEFAULT_MIN_ATTEMPTS,
    DeviceProgress,
    Policy,
    ShadowReport,
    evaluate,
    plan_waves,
    shadow_gate,
)
from edgert.mqtt.config import BrokerConfig
from edgert.mqtt.repo_protocol import assignment_topic
from edgert.mqtt.topics import PREFIX, check_id, deployment_topic, parse_topic

__all__ = [
    "LEASE_TTL_S",
    "TICK_S",
    "Attachment",
    "Controller",
    "ControllerService",
    "ControllerSettings",
    "assignment_topic",
    "create_rollout",
    "request_rollback",
    "set_paused",
]

log = logging.getLogger("edgert.fleet.controller")

#: A controller that stops renewing (killed) loses the fleet to a replica after this long.
LEASE_TTL_S = 15.0
#: How often the acting controller evaluates rollouts and renews its lease.
TICK_S = 0.5
#: Messages waiting to be written to the db; beyond this new ones are dropped and counted.
MAX_QUEUE = 100_000
MAX_MESSAGE_BYTES = 256 * 1024
INGEST_BATCH = 500
UPDATE_STATES = frozenset(
    {"downloading", "verifying", "installing", "healthy", "active", "failed", "rolled-back"}
)

Publish = Callable[[str, bytes, bool], None]  # topic, payload, retain


class Attachment(Protocol):
    """A part that shares the controller's MQTT link (e.g. the repository responder)."""

    def topics(self, fleet: str) -> Sequence[str]:
        """Topic filters to subscribe to (renewed on every reconnect)."""

    def handle(self, topic: str, payload: bytes, publish: Publish) -> None:
        """One message on those filters (network thread: return quickly or hand off)."""


@dataclass(frozen=True)
class ControllerSettings:
    """Who this controller is and how it paces itself."""

    fleet: str
    controller_id: str = field(default_factory=lambda: f"ctl-{secrets.token_hex(4)}")
    lease_ttl_s: float = LEASE_TTL_S
    tick_s: float = TICK_S
    min_shadow_samples: int = 1


class Controller:
    """Rollout execution and ingest over a :class:`FleetDB`; publishes through ``publish``."""

    def __init__(
        self, settings: ControllerSettings, db: FleetDB, key: Ed25519PrivateKey, publish: Publish
    ) -> None:
        check_id(settings.fleet, "fleet id")
        self.s, self.db, self.key, self.publish = settings, db, key, publish
        self.acting = False

    # -- ingest -------------------------------------------------------------------------------------
    def handle_message(self, topic: str, payload: bytes, now: float) -> None:
        """Store one device message; malformed ones are logged and skipped, never raised."""
        try:
            t = parse_topic(topic)
            if t.kind != "device" or t.fleet != self.s.fleet or t.device is None:
                return
            doc = json.loads(payload) if payload else None
        except (SyncError, ValueError, RecursionError):
            log.info("ignored malformed message", extra={"topic": topic[:200]})
            return
        if not isinstance(doc, dict):
            return
        fleet, device = t.fleet, t.device
        if t.channel == "status":
            online = doc.get("state") == "online"
            models = doc.get("models")
            versions = _versions(models) if online and isinstance(models, dict) else None
            self.db.record_status(fleet, device, online=online, versions=versions, now=now)
        elif t.channel == "telemetry":
            self._telemetry(device, doc, now)
        elif t.channel == "events":
            self._event(device, doc, now)

    def _telemetry(self, device: str, doc: Mapping[str, Any], now: float) -> None:
        models = doc.get("models")
        if not isinstance(models, dict):
            return
        if not doc.get("replayed"):  # a replayed reading must not overwrite the current value
            p99 = {m: _num(_get(s, "latency_s", "p99")) for m, s in models.items() if isinstance(s, dict)}
            self.db.record_telemetry(self.s.fleet, device, p99=p99, now=now)
        for name, stats in models.items():
            shadow = stats.get("shadow") if isinstance(stats, dict) else None
            if isinstance(shadow, dict):
                for r in self.db.rollouts(self.s.fleet, model=name, states=["running", "paused"]):
                    if shadow.get("version") in (None, r.version):
                        self._shadow(r.id, device, shadow, now)

    def _shadow(self, rollout: str, device: str, d: Mapping[str, Any], now: float) -> None:
        agreement, ratio, samples = _num(d.get("agreement")), _num(d.get("latency_ratio")), d.get("samples")
        if agreement is not None and ratio is not None and isinstance(samples, int):
            self.db.record_shadow(
                rollout, device, agreement=agreement, latency_ratio=ratio, samples=samples, now=now
            )

    def _event(self, device: str, doc: Mapping[str, Any], now: float) -> None:
        rollout = doc.get("rollout")
        if not isinstance(rollout, str):
            return
        if doc.get("event") == "shadow":
            self._shadow(rollout, device, doc, now)
            return
        state = doc.get("state")
        if doc.get("event") != "update" or state not in UPDATE_STATES:
            return
        reason = str(doc["reason"])[:500] if doc.get("reason") is not None else None
        if self.db.record_update(rollout, device, state=state, reason=reason, now=now):
            self.db.set_health(self.s.fleet, device, state if not reason else f"{state}: {reason}", now)
            self.db.add_event(
                self.s.fleet,
                "update",
                now,
                device=device,
                rollout=rollout,
                body={k: doc.get(k) for k in ("state", "version", "progress", "reason")},
            )

    # -- rollouts -----------------------------------------------------------------------------------
    def tick(self, now: float) -> bool:
        """Renew the lease; if we hold it, advance every running rollout. True if this controller acts."""
        acting = self.db.acquire_lease(self.s.controller_id, self.s.lease_ttl_s, now, _lease(self.s.fleet))
        if acting != self.acting:
            log.warning(
                "lease %s",
                "acquired" if acting else "lost",
                extra={"controller": self.s.controller_id, "fleet": self.s.fleet},
            )
            self.acting = acting
        if acting:
            for r in self.db.rollouts(self.s.fleet, states=["running"]):
                try:
                    self._step(r, now)
                except (FleetStateError, SyncError) as exc:
                    log.error("rollout step failed", extra={"rollout": r.id, "error": exc.message})
        return acting

    def release(self) -> None:
        """Give up the lease (clean shutdown) so a replica takes over at once."""
        self.db.release_lease(self.s.controller_id, _lease(self.s.fleet))
        self.acting = False

    def _step(self, r: Rollout, now: float) -> None:
        if r.current_wave < 0:
            plan = plan_waves(self.db.group_devices(r.fleet, r.group), r.waves, salt=r.id)
            if not plan:
                self._halt(r, f"group {r.group} has no devices", now, [])
                return
            self.db.set_rollout_devices(r.id, plan, now)
            self._start_wave(r, 0, now)
            return
        rows = self.db.rollout_devices(r.id)
        status = self.db.device_status(r.fleet)
        wave = [x for x in rows if x["wave"] == r.current_wave]
        last = r.current_wave == max(x["wave"] for x in rows)
        progress = {x["device"]: _progress(x, status.get(x["device"], {}), r.model) for x in rows}
        policy = Policy(r.wait_healthy_s, r.max_failure_rate, r.min_attempts)
        started = r.wave_started if r.wave_started is not None else now
        decision = evaluate(
            [progress[x["device"]] for x in wave],
            target_version=r.version,
            wave_started=started,
            now=now,
            policy=policy,
            earlier=[progress[x["device"]] for x in rows if x["wave"] < r.current_wave],
            last_wave=last,
        )
        if decision.action == "halt" and "failure rate" in decision.reason:
            self._halt(r, decision.reason, now, wave)
        elif r.phase == "shadow":
            self._shadow_step(r, wave, started, now)
        elif decision.action == "halt":
            self._halt(r, decision.reason, now, wave)
        elif decision.action == "advance":
            self._start_wave(r, r.current_wave + 1, now)
        elif decision.action == "complete":
            self._complete(r, now, rows)

    def _shadow_step(self, r: Rollout, wave: list[dict[str, Any]], started: float, now: float) -> None:
        reports = [
            ShadowReport(x["device"], x["agreement"], x["latency_ratio"], x["samples"])
            for x in wave
            if x["samples"] is not None
        ]
        gate = shadow_gate(
            reports,
            expected=len(wave),
            min_agreement=r.min_agreement or 0.0,
            max_latency_ratio=r.max_latency_ratio or float("inf"),
            min_samples=self.s.min_shadow_samples,
        )
        if gate.action == "advance":
            self.db.add_event(r.fleet, "shadow-passed", now, rollout=r.id, body={"detail": gate.reason})
            self._publish_wave(r, r.current_wave, [x["device"] for x in wave], shadow=False, now=now)
            # States reported while shadowing say nothing about serving the new version: start over.
            self.db.execute(
                "UPDATE rollout_devices SET state = NULL, healthy = NULL WHERE rollout = ? AND"
                " wave = ? AND (state IS NULL OR state NOT IN ('failed', 'rolled-back'))",
                (r.id, r.current_wave),
            )
            self.db.update_rollout(r.id, now, phase="deploy", wave_started=now)
        elif gate.action == "halt":
            self._halt(r, gate.reason, now, wave)
        elif now - started >= r.wait_healthy_s:
            self._halt(
                r,
                f"shadow results from {gate.counts['reported']} of {len(wave)} devices "
                f"within {r.wait_healthy_s:g} s",
                now,
                wave,
            )

    def _publish_wave(self, r: Rollout, k: int, devices: Sequence[str], *, shadow: bool, now: float) -> None:
        seq = self.db.next_seq(r.fleet)
        doc = docs_sign.desired_state(
            fleet=r.fleet,
            seq=seq,
            rollout=r.id,
            model=r.model,
            version=r.version,
            issued=int(now),
            wave=k,
            shadow_percent=r.shadow_percent if shadow else None,
        )
        payload = docs_sign.encode(docs_sign.sign_document(doc, self.key))  # one signature per wave
        for d in devices:
            self.publish(assignment_topic(r.fleet, d), payload, True)

    def _start_wave(self, r: Rollout, k: int, now: float) -> None:
        devices = [x["device"] for x in self.db.rollout_devices(r.id) if x["wave"] == k]
        shadow = r.shadow_percent is not None
        # Publish first: if we die before the db update, the next actor republishes with a higher seq.
        self._publish_wave(r, k, devices, shadow=shadow, now=now)
        self.db.update_rollout(
            r.id, now, current_wave=k, phase="shadow" if shadow else "deploy", wave_started=now
        )
        self.db.add_event(r.fleet, "wave", now, rollout=r.id, body={"wave": k, "devices": len(devices)})
        log.info("wave started", extra={"rollout": r.id, "wave": k, "devices": len(devices)})

    def _complete(self, r: Rollout, now: float, rows: list[dict[str, Any]]) -> None:
        seq = self.db.next_seq(r.fleet)
        doc = docs_sign.desired_state(
            fleet=r.fleet, seq=seq, rollout=r.id, model=r.model, version=r.version, issued=int(now)
        )
        self.publish(
            deployment_topic(r.fleet, r.group), docs_sign.encode(docs_sign.sign_document(doc, self.key)), True
        )
        self.db.set_deployed(r.fleet, r.group, r.model, r.version, seq, r.id)
        for x in rows:  # the group document (higher seq) now rules; drop the per-device ones
            self.publish(assignment_topic(r.fleet, x["device"]), b"", True)
        self.db.update_rollout(r.id, now, state="complete", reason=None)
        self.db.add_event(r.fleet, "complete", now, rollout=r.id, body={"seq": seq})
        log.info("rollout complete", extra={"rollout": r.id, "version": r.version})

    def _halt(self, r: Rollout, reason: str, now: float, wave: list[dict[str, Any]]) -> None:
        # Emergency shutdown: devices of the wave that have not started are taken off the rollout (their
        # retained assignment is cleared, so they keep following the group's document).
        for x in wave:
            if x["state"] is None:
                self.publish(assignment_topic(r.fleet, x["device"]), b"", True)
        self.db.update_rollout(r.id, now, state="halted", reason=reason)
        self.db.add_event(r.fleet, "halt", now, rollout=r.id, body={"reason": reason, "wave": r.current_wave})
        log.warning("rollout halted", extra={"rollout": r.id, "reason": reason})


# -- operator commands (db only) -------------------------------------------------------------------
def create_rollout(
    db: FleetDB,
    *,
    fleet: str,
    group: str,
    model: str,
    version: str,
    waves: Sequence[float],
    wait_healthy_s: float,
    max_failure_rate: float,
    now: float,
    min_attempts: int = DEFAULT_MIN_ATTEMPTS,
    shadow_percent: float | None = None,
    min_agreement: float | None = None,
    max_latency_ratio: float | None = None,
    kind: str = "deploy",
    previous_version: str | None = None,
) -> Rollout:
    """Record a rollout (the acting controller starts it on its next tick) and return it."""
    for value, what in (
        (fleet, "fleet id"),
        (group, "group id"),
        (model, "model name"),
        (version, "version"),
    ):
        check_id(value, what)
    if shadow_percent is not None and (min_agreement is None or max_latency_ratio is None):
        raise ConfigError(
            "--shadow needs --min-agreement and --max-latency-ratio",
            hint="e.g. --shadow 10% --min-agreement 0.98 --max-latency-ratio 1.5",
        )
    if kind == "deploy":
        current = db.deployed_version(fleet, group, model)
        previous_version = current[0] if current else None
    r = Rollout(
        id=f"{model}-{version}-{secrets.token_hex(4)}",
        fleet=fleet,
        group=group,
        model=model,
        version=version,
        previous_version=previous_version,
        kind=kind,
        waves=tuple(waves),
        wait_healthy_s=wait_healthy_s,
        max_failure_rate=max_failure_rate,
        min_attempts=min_attempts,
        shadow_percent=shadow_percent,
        min_agreement=min_agreement,
        max_latency_ratio=max_latency_ratio,
        state="running",
        current_wave=-1,
        phase="deploy",
        wave_started=None,
        reason=None,
        created=now,
        updated=now,
    )
    db.create_rollout(r)
    db.add_event(fleet, kind, now, rollout=r.id, body={"group": group, "model": model, "version": version})
    return r


def request_rollback(db: FleetDB, *, fleet: str, group: str, model: str, now: float) -> Rollout:
    """Stop the group's latest rollout of ``model`` and deploy the version before it as a new rollout
    (one wave, never auto-halted on failures); its documents carry a higher seq than any before."""
    latest = [r for r in db.rollouts(fleet, group=group, model=model) if r.kind == "deploy"]
    if not latest:
        raise FleetStateError(f"no rollout of {model} to group {group} to roll back")
    r = latest[0]
    if r.previous_version is None:
        raise FleetStateError(
            f"rollout {r.id} has no previous version of {model} for group {group}",
            hint="deploy a known-good version with 'edgert fleet deploy' instead",
        )
    for active in db.rollouts(fleet, group=group, model=model, states=["running", "paused"]):
        db.update_rollout(active.id, now, state="rolled-back", reason="rolled back by the operator")
    return create_rollout(
        db,
        fleet=fleet,
        group=group,
        model=model,
        version=r.previous_version,
        waves=(1.0,),
        wait_healthy_s=r.wait_healthy_s,
        max_failure_rate=1.0,
        now=now,
        kind="rollback",
        previous_version=r.version,
    )


def set_paused(
    db: FleetDB, *, fleet: str, group: str, model: str | None, paused: bool, now: float
) -> list[str]:
    """Pause (or resume) the group's active rollouts; resuming restarts the wave's wait. Returns their ids."""
    want, to = ("running", "paused") if paused else ("paused", "running")
    ids = []
    for r in db.rollouts(fleet, group=group, model=model, states=[want]):
        extra = {} if paused else {"wave_started": now}
        db.update_rollout(r.id, now, state=to, **extra)
        db.add_event(fleet, "pause" if paused else "resume", now, rollout=r.id)
        ids.append(r.id)
    if not ids:
        raise FleetStateError(
            f"no {want} rollout for group {group}" + (f" and model {model}" if model else "")
        )
    return ids


# -- the service shell -----------------------------------------------------------------------------
class ControllerService:
    """Runs a :class:`Controller` on an MQTT link: subscribe, queue messages, ingest and tick in a loop."""

    def __init__(
        self,
        settings: ControllerSettings,
        db: FleetDB,
        key: Ed25519PrivateKey,
        broker: BrokerConfig,
        *,
        attachments: Sequence[Attachment] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        from edgert.mqtt.client import MqttLink

        self.settings, self.clock, self.attachments = settings, clock, list(attachments)
        self.queue: queue.Queue[tuple[str, bytes, float]] = queue.Queue(MAX_QUEUE)
        self.dropped = 0
        self.link = MqttLink(broker, on_connect=self._on_connect, on_message=self._on_message)
        self.controller = Controller(settings, db, key, self._publish)
        self._stop = threading.Event()

    def attach(self, attachment: Attachment) -> None:
        """Add a part that shares the link (call before :meth:`start`), e.g. the repository responder."""
        self.attachments.append(attachment)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        self.link.publish(topic, payload, qos=1, retain=retain)

    def _filters(self) -> list[str]:
        base = f"{PREFIX}/{self.settings.fleet}/devices/+/"
        return [base + c for c in ("status", "telemetry", "events")]

    def _on_connect(self, session_present: bool) -> None:
        for f in self._filters():
            self.link.subscribe(f, qos=1)
        for a in self.attachments:
            for f in a.topics(self.settings.fleet):
                self.link.subscribe(f, qos=1)

    def _on_message(self, topic: str, payload: bytes, props: Any) -> None:
        from paho.mqtt.client import topic_matches_sub

        for a in self.attachments:
            if any(topic_matches_sub(f, topic) for f in a.topics(self.settings.fleet)):
                a.handle(topic, payload, self._publish)
                return
        if len(payload) > MAX_MESSAGE_BYTES:
            return
        try:
            self.queue.put_nowait((topic, payload, self.clock()))
        except queue.Full:
            self.dropped += 1

    def start(self) -> None:
        """Connect (in the background)."""
        self.link.start()

    def run(self) -> None:
        """Ingest and tick until :meth:`stop`."""
        next_tick = 0.0
        while not self._stop.is_set():
            try:
                item: tuple[str, bytes, float] | None = self.queue.get(timeout=self.settings.tick_s / 2)
            except queue.Empty:
                item = None
            n = 0
            while item is not None:
                self._ingest(item)
                n += 1
                try:
                    item = self.queue.get_nowait() if n < INGEST_BATCH else None
                except queue.Empty:
                    item = None
            now = self.clock()
            if now >= next_tick:
                try:
                    self.controller.tick(now)
                except FleetStateError as exc:  # the db is away: keep ingesting, retry next tick
                    log.error("controller tick failed", extra={"error": exc.message})
                next_tick = now + self.settings.tick_s

    def _ingest(self, item: tuple[str, bytes, float]) -> None:
        try:
            self.controller.handle_message(*item)
        except FleetStateError as exc:
            log.error("cannot store device message", extra={"topic": item[0][:200], "error": exc.message})

    def stop(self, *, release: bool = True) -> None:
        """Stop the loop and the link; release the lease unless simulating a crash."""
        self._stop.set()
        if release:
            self.controller.release()
        self.link.stop()


def _lease(fleet: str) -> str:
    return f"fleet:{fleet}"


def _get(d: Any, *path: str) -> Any:
    for p in path:
        d = d.get(p) if isinstance(d, dict) else None
    return d


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _versions(models: Mapping[str, Any]) -> dict[str, str]:
    """Status ``models`` as name -> version: values are a version string or ``{"version": …}``."""
    out = {}
    for name, v in models.items():
        ver = v.get("version") if isinstance(v, dict) else v
        if isinstance(ver, (str, int)):
            out[str(name)] = str(ver)
    return out


def _progress(row: Mapping[str, Any], status: Mapping[str, Any], model: str) -> DeviceProgress:
    return DeviceProgress(
        row["device"],
        state=row["state"],
        healthy=row["healthy"],
        last_seen=status.get("last_seen"),
        version=(status.get("versions") or {}).get(model),
    )
