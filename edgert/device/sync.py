"""The device sync service: status, spooled telemetry and events, signed commands over MQTT.

Threads: the :class:`~edgert.mqtt.client.MqttLink` network thread, a drainer that moves spooled
records to the broker (window of ``max_inflight`` unacknowledged QoS 1 publishes, acks deleted in
batches), a telemetry timer and a command worker. Nothing here is ever called from the inference
path, so an unreachable broker cannot slow inference: the telemetry timer only reads the metrics
snapshot and writes to SQLite.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgert import __version__
from edgert.device.commands import AuditSink, CommandProcessor, Handler
from edgert.device.logtail import LogRing
from edgert.device.status import offline_status, online_status
from edgert.device.sync_config import MqttSettings
from edgert.device.telemetry import DeviceStats, build_telemetry
from edgert.errors import SyncError
from edgert.mqtt import topics
from edgert.mqtt.client import MAX_PAYLOAD_BYTES, MqttLink
from edgert.mqtt.config import MAX_TELEMETRY_INTERVAL_S, MIN_TELEMETRY_INTERVAL_S
from edgert.mqtt.nonces import NONCE_FILE, PersistentNonceCache
from edgert.mqtt.signing import NonceCache, NonceStore, load_public_key
from edgert.mqtt.spool import Record, Spool

__all__ = ["MAX_LOG_LINES", "SyncService"]

log = logging.getLogger("edgert.device.sync")

MAX_LOG_LINES = 200
MAX_LOG_BYTES = 64 * 1024
COMMAND_QUEUE = 32
#: How long stop() waits for the graceful ``offline`` status to be acknowledged.
OFFLINE_ACK_TIMEOUT_S = 2.0
_REPLAYED_SUFFIX = b',"replayed":true}'
#: Largest payload the spool accepts: the replay flag must still fit under the publish limit.
MAX_SPOOLED_BYTES = MAX_PAYLOAD_BYTES - len(_REPLAYED_SUFFIX)
#: MQTT 5 reason code "Packet too large", recorded when an oversized record is set aside locally.
PACKET_TOO_LARGE = 0x95


class MessageRoute(Protocol):
    """Something else on the device that listens on MQTT topics (the updater)."""

    def subscriptions(self) -> list[str]:
        """Topics (or filters) to subscribe on every connect."""
        ...

    def handle_message(self, topic: str, payload: bytes) -> bool:
        """Take a message if it is this route's; True when it was. Must not block."""
        ...


def _empty() -> Mapping[str, Any]:
    return {}


class SyncService:
    """Keeps one device in sync with the fleet over MQTT; a daemon service with start()/stop()."""

    def __init__(
        self,
        cfg: MqttSettings,
        *,
        spool: Spool | None = None,
        status_provider: Callable[[], Mapping[str, Any]] = _empty,
        stats_provider: Callable[[], Mapping[str, Any]] = _empty,
        audit: AuditSink | None = None,
        handlers: Mapping[str, Handler] | None = None,
        log_tail: Callable[[int], list[str]] | None = None,
        device_stats: DeviceStats | None = None,
        clock: Callable[[], float] = time.time,
        state_root: str | os.PathLike[str] | None = None,
        nonce_path: str | os.PathLike[str] | None = None,
        audit_head: Callable[[], Mapping[str, Any] | None] = lambda: None,
    ) -> None:
        from edgert.paths import spool_path, state_dir

        self.cfg = cfg
        self.clock = clock
        spool_file = cfg.sync.spool_path or spool_path(state_dir(state_root))
        self.spool = spool or Spool(spool_file, cfg.sync.spool_max_records)
        self.status_provider, self.stats_provider = status_provider, stats_provider
        self.audit_head = audit_head
        self._routes: list[MessageRoute] = []
        self.device_stats = device_stats or DeviceStats(disk_path=str(Path(self.spool.path).parent))
        # Without a log source from the daemon, keep our own tail of the edgert.* log records.
        self._log_ring = LogRing() if log_tail is None else None
        self.log_tail = log_tail or (self._log_ring.tail if self._log_ring else None)
        self.interval = cfg.sync.telemetry_interval
        self.boot_id = secrets.token_hex(4)
        self.seq = 0
        self.status_topic = topics.device_topic(cfg.sync.fleet, cfg.sync.device_id, "status")
        self.telemetry_topic = topics.device_topic(cfg.sync.fleet, cfg.sync.device_id, "telemetry")
        self.events_topic = topics.device_topic(cfg.sync.fleet, cfg.sync.device_id, "events")
        self.cmd_topic = topics.device_topic(cfg.sync.fleet, cfg.sync.device_id, "cmd")
        self.reply_topic = topics.device_topic(cfg.sync.fleet, cfg.sync.device_id, "reply")
        key = load_public_key(cfg.sync.command_key_file) if cfg.sync.command_key_file else None
        # Nonces persist next to the spool so a captured command cannot be replayed after a restart.
        self.nonces: NonceStore = (
            PersistentNonceCache(nonce_path or Path(self.spool.path).parent / NONCE_FILE, now=clock())
            if key is not None
            else NonceCache()
        )
        self.commands = CommandProcessor(
            cfg.sync.fleet,
            cfg.sync.device_id,
            key,
            handlers=self._handlers(handlers or {}),
            audit=audit or _no_audit,
            nonces=self.nonces,
        )
        self.link = MqttLink(
            cfg.broker,
            will=(self.status_topic, offline_status(device=cfg.sync.device_id, graceful=False)),
            on_connect=self._on_connect,
            on_puback=self._on_puback,
            on_message=self._on_message,
        )
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}
        self._generation = self.spool.generation
        self._acks: collections.deque[tuple[int, int, str]] = collections.deque()
        self._last_sent = 0
        self._replay_upto = 0
        self._status_mid: int | None = None
        self._status_acked = threading.Event()
        self._wake = threading.Event()
        self._tick = threading.Event()
        self._stop = threading.Event()
        self._cmds: queue.Queue[tuple[bytes, bytes | None] | None] = queue.Queue(COMMAND_QUEUE)
        self._threads: list[threading.Thread] = []
        # commands_busy: commands answered ``busy`` because the command queue was full.
        self.counters = {
            "published": 0,
            "acked": 0,
            "rejected": 0,
            "replayed": 0,
            "commands": 0,
            "commands_busy": 0,
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the network, drain, telemetry and command threads; returns at once."""
        if self._log_ring is not None:
            self._log_ring.attach()
        for name, target in (
            ("drain", self._drain_loop),
            ("telemetry", self._telemetry_loop),
            ("commands", self._command_loop),
        ):
            thread = threading.Thread(target=target, name=f"edgert-mqtt-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self.link.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Publish a graceful ``offline`` status if connected, then stop every thread."""
        if self.link.connected.is_set():
            self._status_acked.clear()
            self._status_mid = self.link.publish(
                self.status_topic, offline_status(device=self.cfg.sync.device_id, graceful=True), retain=True
            )
            self._status_acked.wait(OFFLINE_ACK_TIMEOUT_S)
        self._stop.set()
        self._wake.set()
        self._tick.set()
        try:
            self._cmds.put_nowait(None)
        except queue.Full:
            pass  # the worker sees _stop after its next item; never block stop() on a busy handler
        for thread in self._threads:
            thread.join(timeout)
        self._threads.clear()
        self.link.stop(timeout)
        self._apply_acks()
        self.spool.close()
        if isinstance(self.nonces, PersistentNonceCache):
            self.nonces.close()
        if self._log_ring is not None:
            self._log_ring.detach()

    # -- public operations -------------------------------------------------------------------
    def publish_telemetry(self) -> int:
        """Take one telemetry reading and spool it; return the number of messages spooled."""
        snapshot = self.stats_provider()
        self.seq += 1
        parts = build_telemetry(
            device=self.cfg.sync.device_id,
            boot_id=self.boot_id,
            seq=self.seq,
            ts=self.clock(),
            interval_s=self.interval,
            models=snapshot.get("models", {}),
            device_stats=self.device_stats.read(),
            sync_stats=self.spool.stats(),
            audit={"head": head} if (head := self.audit_head()) is not None else None,
        )
        for payload in parts:
            self.spool.enqueue(self.telemetry_topic, payload, self.clock())
        self._wake.set()
        return len(parts)

    def emit_event(self, payload: bytes) -> None:
        """Spool a JSON event document for the ``events`` channel (refused if over the size limit)."""
        if len(payload) > MAX_SPOOLED_BYTES:
            raise SyncError(
                f"event is {len(payload)} bytes; MQTT messages are limited to {MAX_SPOOLED_BYTES} bytes",
                hint="send a smaller event (summaries, not raw data)",
            )
        self.spool.enqueue(self.events_topic, payload, self.clock())
        self._wake.set()

    def set_interval(self, seconds: float) -> None:
        """Change the telemetry interval at run time."""
        if not MIN_TELEMETRY_INTERVAL_S <= seconds <= MAX_TELEMETRY_INTERVAL_S:
            raise ValueError(f"interval must be in {MIN_TELEMETRY_INTERVAL_S}..{MAX_TELEMETRY_INTERVAL_S} s")
        self.interval = float(seconds)
        self._tick.set()

    def stats(self) -> dict[str, Any]:
        """Connection state, counters and spool statistics (for status, CLI and tests)."""
        err = self.link.last_error
        return {
            "connected": self.link.connected.is_set(),
            "connects": self.link.connects,
            "last_error": err.message if err else None,
            "inflight": len(self._inflight),
            **self.counters,
            "spool": self.spool.stats(),
        }

    # -- network callbacks -------------------------------------------------------------------
    def add_route(self, route: MessageRoute) -> None:
        """Deliver messages on ``route.subscriptions()`` to ``route.handle_message`` (e.g. the updater).

        Call before :meth:`start`; routes are subscribed on every (re)connect.
        """
        self._routes.append(route)

    def _on_connect(self, session_present: bool) -> None:
        self._replay_upto = self.spool.last_id()
        self.link.subscribe(self.cmd_topic, qos=1)
        for route in self._routes:
            for topic in route.subscriptions():
                self.link.subscribe(topic, qos=1)
        info = self.status_provider()
        self.link.publish(
            self.status_topic,
            online_status(
                device=self.cfg.sync.device_id,
                version=__version__,
                ts=self.clock(),
                uptime_s=time.monotonic() - self._started,
                info=info,
            ),
            retain=True,
        )
        self._wake.set()

    def _on_puback(self, mid: int, code: int, reason: str) -> None:
        # Runs under paho's message lock: only record the ack; the drainer does the SQLite work.
        if mid == self._status_mid:
            self._status_acked.set()
        self._acks.append((mid, code, reason))
        self._wake.set()

    def _on_message(self, topic: str, payload: bytes, props: Any) -> None:
        if topic != self.cmd_topic:
            for route in self._routes:
                try:
                    if route.handle_message(topic, payload):  # must not block the network thread
                        return
                except Exception:  # one bad message must never stop the MQTT thread
                    log.exception("message handler failed", extra={"topic": topic})
            return
        corr = getattr(props, "CorrelationData", None) if props is not None else None
        corr = bytes(corr) if corr else None
        try:
            self._cmds.put_nowait((payload, corr))
        except queue.Full:
            # Tell the fleet instead of dropping silently; the command is neither verified nor run
            # (and its nonce is not recorded), so the fleet may send it again, re-signed or as is.
            self.counters["commands_busy"] += 1
            log.warning("command queue full; replied busy", extra={"queue": COMMAND_QUEUE})
            self._reply(
                self.commands.busy_reply(
                    payload, f"the device's command queue is full ({COMMAND_QUEUE}); retry later"
                ),
                corr,
            )

    # -- drainer -----------------------------------------------------------------------------
    def _drain_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            try:
                self._apply_acks()
                if self.link.connected.is_set():
                    self._fill_window()
            except Exception:
                log.exception("telemetry drain failed; will retry")
                self._stop.wait(1.0)

    def _apply_acks(self) -> None:
        done: list[int] = []
        while self._acks:
            mid, code, reason = self._acks.popleft()
            with self._lock:
                rid = self._inflight.pop(mid, None)
            if rid is None:
                continue  # status or reply publishes: not spooled
            if code >= 0x80:
                self.spool.reject(rid, code, reason)
                self.counters["rejected"] += 1
                log.warning(
                    "broker rejected a spooled message", extra={"reason_code": code, "reason": reason}
                )
            else:
                done.append(rid)
        self.spool.ack_many(done)
        self.counters["acked"] += len(done)

    def _fill_window(self) -> None:
        if self.spool.generation != self._generation:
            # The spool was rebuilt (corruption): ids restart, so restart the cursor too.
            self._generation, self._last_sent = self.spool.generation, 0
            with self._lock:
                self._inflight.clear()
        room = self.cfg.broker.max_inflight - len(self._inflight)
        if room <= 0:
            return
        for record in self.spool.peek(self._last_sent, room):
            if not self.link.connected.is_set():
                return
            if len(record.payload) > MAX_SPOOLED_BYTES:
                # Only a spool written by an older version can hold one; never let it block the rest.
                self.spool.reject(record.id, PACKET_TOO_LARGE, "payload over the device's size limit")
                self.counters["rejected"] += 1
                self._last_sent = record.id
                continue
            mid = self._send(record)
            self._last_sent = record.id
            with self._lock:
                self._inflight[mid] = record.id

    def _send(self, record: Record) -> int:
        payload, props = record.payload, None
        if record.id <= self._replay_upto and payload.endswith(b"}"):
            payload = payload[:-1] + _REPLAYED_SUFFIX
            self.counters["replayed"] += 1
        if self.cfg.broker.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = "application/json"
        self.counters["published"] += 1
        return self.link.publish(record.topic, payload, qos=1, properties=props)

    # -- telemetry ---------------------------------------------------------------------------
    def _telemetry_loop(self) -> None:
        next_at = time.monotonic() + self.interval
        while not self._stop.is_set():
            self._tick.wait(max(0.0, next_at - time.monotonic()))
            if self._tick.is_set():
                self._tick.clear()
                next_at = time.monotonic() + self.interval
                continue
            next_at += self.interval
            if next_at < time.monotonic():
                next_at = time.monotonic() + self.interval
            try:
                self.publish_telemetry()
            except Exception:
                log.exception("telemetry reading failed")

    # -- commands ----------------------------------------------------------------------------
    def _command_loop(self) -> None:
        while True:
            item = self._cmds.get()
            if item is None or self._stop.is_set():
                return
            payload, corr = item
            self.counters["commands"] += 1
            try:
                self._reply(self.commands.handle(payload, now=self.clock()), corr)
            except Exception:  # one bad command must never stop the device taking commands
                log.exception("command processing failed")

    def _reply(self, reply: Mapping[str, Any], corr: bytes | None) -> None:
        """Publish a reply, correlated like the request (MQTT 5 correlation data; request_id inside)."""
        import json

        props = None
        if self.cfg.broker.mqtt5 and corr is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
        try:
            self.link.publish(
                self.reply_topic, json.dumps(reply, default=str).encode(), qos=1, properties=props
            )
        except SyncError as exc:
            log.warning("cannot send command reply", extra={"error": exc.message})

    def _handlers(self, extra: Mapping[str, Handler]) -> dict[str, Handler]:
        handlers: dict[str, Handler] = {
            "get-status": lambda args: {"status": dict(self.status_provider()), "sync": self.stats()},
            "get-config": lambda args: {
                "mqtt": _public_config(self.cfg),
                "telemetry_interval": self.interval,
            },
            "set-telemetry-interval": self._cmd_set_interval,
            "collect-logs": self._cmd_collect_logs,
        }
        handlers.update(extra)
        return handlers

    def _cmd_set_interval(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        seconds = args.get("seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise ValueError("args.seconds must be a number")
        self.set_interval(float(seconds))
        return {"telemetry_interval": self.interval}

    def _cmd_collect_logs(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.log_tail is None:
            raise ValueError("this device has no log source configured")
        lines = args.get("lines", 50)
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 1:
            raise ValueError("args.lines must be a positive integer")
        tail = self.log_tail(min(lines, MAX_LOG_LINES))[-MAX_LOG_LINES:]
        out: list[str] = []
        size = 0
        for line in reversed(tail):
            size += len(line.encode()) + 1
            if size > MAX_LOG_BYTES:
                break
            out.append(line)
        return {"lines": list(reversed(out)), "truncated": len(out) < len(tail)}


def _public_config(cfg: MqttSettings) -> dict[str, Any]:
    """The config without anything secret (paths are fine; file contents are never read here)."""
    return cfg.public()


def _no_audit(event: str, **fields: Any) -> None:
    pass
