"""Fleet state: SQLite by default (one file, WAL, 0600), PostgreSQL (psycopg 3) for shared controllers.

One code path: SQL is written once with ``?`` placeholders and portable types; :class:`_Dialect`
rewrites the placeholders and the two column types that differ. Every method takes ``now`` where time
matters, so tests move the clock. The ``leases`` row makes one controller the actor of a fleet: a
controller that stops renewing (killed) loses it after ``ttl_s`` and another takes over.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, StoreError

__all__ = [
    "BUSY_TIMEOUT_MS",
    "ROLLOUT_STATES",
    "FleetDB",
    "FleetStateError",
    "Rollout",
    "import_device_records",
    "open_db",
]

BUSY_TIMEOUT_MS = 5000
PG_CONNECT_TIMEOUT_S = 10
SCHEMA_VERSION = 1
#: running -> paused <-> running; running -> halted | complete | rolled-back (superseded by a rollback).
ROLLOUT_STATES = ("running", "paused", "halted", "complete", "rolled-back")
ACTIVE_STATES = ("running", "paused")
MAX_EVENT_BYTES = 16 * 1024

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS devices (fleet TEXT NOT NULL, device TEXT NOT NULL, enrolled TEXT,"
    " PRIMARY KEY (fleet, device))",
    "CREATE TABLE IF NOT EXISTS group_members (fleet TEXT NOT NULL, group_name TEXT NOT NULL,"
    " device TEXT NOT NULL, PRIMARY KEY (fleet, group_name, device))",
    "CREATE TABLE IF NOT EXISTS seqs (fleet TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS rollouts (id TEXT PRIMARY KEY, fleet TEXT NOT NULL, group_name TEXT NOT NULL,"
    " model TEXT NOT NULL, version TEXT NOT NULL, previous_version TEXT, kind TEXT NOT NULL,"
    " waves TEXT NOT NULL, wait_healthy_s REAL8 NOT NULL, max_failure_rate REAL8 NOT NULL,"
    " min_attempts INTEGER NOT NULL, shadow_percent REAL8, min_agreement REAL8, max_latency_ratio REAL8,"
    " state TEXT NOT NULL, current_wave INTEGER NOT NULL, phase TEXT NOT NULL, wave_started REAL8,"
    " reason TEXT, created REAL8 NOT NULL, updated REAL8 NOT NULL)",
    "CREATE INDEX IF NOT EXISTS rollouts_group ON rollouts (fleet, group_name, model, created)",
    "CREATE TABLE IF NOT EXISTS rollout_devices (rollout TEXT NOT NULL, device TEXT NOT NULL,"
    " wave INTEGER NOT NULL, state TEXT, healthy INTEGER, reason TEXT, agreement REAL8,"
    " latency_ratio REAL8, samples INTEGER, updated REAL8, PRIMARY KEY (rollout, device))",
    "CREATE TABLE IF NOT EXISTS device_status (fleet TEXT NOT NULL, device TEXT NOT NULL,"
    " online INTEGER, last_seen REAL8, versions TEXT, health TEXT, p99 TEXT, updated REAL8,"
    " PRIMARY KEY (fleet, device))",
    "CREATE TABLE IF NOT EXISTS deployments (fleet TEXT NOT NULL, group_name TEXT NOT NULL,"
    " model TEXT NOT NULL, version TEXT NOT NULL, seq BIGINT NOT NULL, rollout TEXT,"
    " PRIMARY KEY (fleet, group_name, model))",
    "CREATE TABLE IF NOT EXISTS events (id SERIALID, fleet TEXT NOT NULL, device TEXT, rollout TEXT,"
    " ts REAL8 NOT NULL, kind TEXT NOT NULL, body TEXT)",
    "CREATE INDEX IF NOT EXISTS events_rollout ON events (rollout, id)",
    "CREATE TABLE IF NOT EXISTS leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires REAL8 NOT NULL)",
]


class FleetStateError(StoreError):
    """The fleet database cannot be opened or refused an operation."""


@dataclass(frozen=True)
class _Dialect:
    name: str
    placeholder: str
    serial_id: str
    real: str

    def sql(self, text: str) -> str:
        return (text.replace("?", self.placeholder).replace("SERIALID", self.serial_id)
                .replace("REAL8", self.real))


SQLITE = _Dialect("sqlite", "?", "INTEGER PRIMARY KEY AUTOINCREMENT", "REAL")
POSTGRES = _Dialect("postgresql", "%s", "BIGSERIAL PRIMARY KEY", "DOUBLE PRECISION")


@dataclass(frozen=True)
class Rollout:
    """One row of ``rollouts``."""

    id: str
    fleet: str
    group: str
    model: str
    version: str
    previous_version: str | None
    kind: str
    waves: tuple[float, ...]
    wait_healthy_s: float
    max_failure_rate: float
    min_attempts: int
    shadow_percent: float | None
    min_agreement: float | None
    max_latency_ratio: float | None
    state: str
    current_wave: int
    phase: str
    wave_started: float | None
    reason: str | None
    created: float
    updated: float

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Rollout:
        """Build from a ``SELECT *`` row of ``rollouts``."""
        vals = list(r)
        vals[7] = tuple(json.loads(vals[7]))
        return cls(*vals)


class FleetDB:
    """Fleet state on one DB-API connection; thread-safe through one lock (the controller is one loop)."""

    def __init__(self, conn: Any, dialect: _Dialect, where: str) -> None:
        self._conn, self.dialect, self.where = conn, dialect, where
        self._lock = threading.RLock()

    # -- plumbing -----------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit of work (SQLite: BEGIN IMMEDIATE, so two writers never deadlock on upgrade)."""
        with self._lock:
            try:
                if self.dialect is SQLITE:
                    self._conn.execute("BEGIN IMMEDIATE")
                yield
                self._conn.commit()
            except BaseException:
                self._conn.rollback()
                raise

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            cur = self._conn.cursor()
            cur.execute(self.dialect.sql(sql), tuple(params))
            return cur
        except Exception as exc:
            if _is_db_error(exc):
                raise FleetStateError(f"fleet database {self.where}: {type(exc).__name__}: "
                                      f"{str(exc).splitlines()[0][:200]}") from None
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; return the row count."""
        with self.transaction():
            return int(self._run(sql, params).rowcount)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a SELECT; return all rows."""
        with self._lock:
            rows = self._run(sql, params).fetchall()
            self._conn.commit()  # end the read transaction (PostgreSQL would hold a snapshot otherwise)
            return [tuple(r) for r in rows]

    def create_schema(self) -> None:
        """Create the tables if missing (idempotent) and record the schema version."""
        with self.transaction():
            for stmt in _SCHEMA:
                self._run(stmt)
            self._run("INSERT INTO meta (key, value) VALUES ('schema', ?) ON CONFLICT (key) DO NOTHING",
                      (str(SCHEMA_VERSION),))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    # -- lease --------------------------------------------------------------------------------------
    def acquire_lease(self, controller_id: str, ttl_s: float, now: float, name: str = "controller") -> bool:
        """Take or renew lease ``name`` for ``ttl_s``; True if ``controller_id`` holds it afterwards.

        One statement decides atomically in both databases: insert, or overwrite only when we already
        hold the row or it has expired (``expires <= now``). Controllers' clocks must agree to well
        within ``ttl_s`` (NTP), since each passes its own ``now``.
        """
        with self.transaction():
            self._run(
                "INSERT INTO leases (name, holder, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                " SET holder = excluded.holder, expires = excluded.expires"
                " WHERE leases.holder = excluded.holder OR leases.expires <= ?",
                (name, controller_id, now + ttl_s, now),
            )
            row = self._run("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
        return bool(row and row[0] == controller_id)

    def release_lease(self, controller_id: str, name: str = "controller") -> None:
        """Give the lease up at once (clean shutdown), if we hold it."""
        self.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, controller_id))

    def lease_holder(self, now: float, name: str = "controller") -> str | None:
        """The controller holding an unexpired lease, or None."""
        rows = self.query("SELECT holder, expires FROM leases WHERE name = ?", (name,))
        return rows[0][0] if rows and rows[0][1] > now else None

    # -- devices and groups -------------------------------------------------------------------------
    def register_device(
        self, fleet: str, device: str, groups: Sequence[str], enrolled: str | None = None
    ) -> None:
        """Add or update a device and replace its group memberships."""
        with self.transaction():
            self._run("INSERT INTO devices (fleet, device, enrolled) VALUES (?, ?, ?)"
                      " ON CONFLICT (fleet, device) DO UPDATE"
                      " SET enrolled = COALESCE(excluded.enrolled, devices.enrolled)",
                      (fleet, device, enrolled))
            self._run("DELETE FROM group_members WHERE fleet = ? AND device = ?", (fleet, device))
            for g in sorted(set(groups)):
                self._run("INSERT INTO group_members (fleet, group_name, device) VALUES (?, ?, ?)",
                          (fleet, g, device))

    def group_devices(self, fleet: str, group: str) -> list[str]:
        """Devices of a group, sorted."""
        rows = self.query("SELECT device FROM group_members WHERE fleet = ? AND group_name = ?"
                          " ORDER BY device", (fleet, group))
        return [r[0] for r in rows]

    def next_seq(self, fleet: str) -> int:
        """The next desired-state sequence number of the fleet (monotonic, shared by controllers)."""
        with self.transaction():
            self._run("INSERT INTO seqs (fleet, seq) VALUES (?, 1) ON CONFLICT (fleet) DO UPDATE"
                      " SET seq = seqs.seq + 1", (fleet,))
            return int(self._run("SELECT seq FROM seqs WHERE fleet = ?", (fleet,)).fetchone()[0])

    # -- device status ------------------------------------------------------------------------------
    def record_status(self, fleet: str, device: str, *, online: bool, versions: Mapping[str, str] | None,
                      now: float) -> None:
        """Store a status message (versions unchanged when None, e.g. an offline will)."""
        vj = json.dumps(dict(versions), sort_keys=True) if versions is not None else None
        self.execute(
            "INSERT INTO device_status (fleet, device, online, last_seen, versions, updated)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, device) DO UPDATE SET online = excluded.online,"
            " last_seen = excluded.last_seen,"
            " versions = COALESCE(excluded.versions, device_status.versions), updated = excluded.updated",
            (fleet, device, int(online), now, vj, now),
        )

    def record_telemetry(
        self, fleet: str, device: str, *, p99: Mapping[str, float | None], now: float
    ) -> None:
        """Store the latest p99 latency per model (seconds) and mark the device seen."""
        pj = json.dumps(dict(p99), sort_keys=True)
        self.execute(
            "INSERT INTO device_status (fleet, device, online, last_seen, p99, updated)"
            " VALUES (?, ?, 1, ?, ?, ?)"
            " ON CONFLICT (fleet, device) DO UPDATE SET last_seen = excluded.last_seen, p99 = excluded.p99,"
            " online = 1, updated = excluded.updated",
            (fleet, device, now, pj, now),
        )

    def set_health(self, fleet: str, device: str, health: str, now: float) -> None:
        """Store the device's last health word (healthy, failed: reason, ...)."""
        self.execute(
            "INSERT INTO device_status (fleet, device, health, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (fleet, device) DO UPDATE SET health = excluded.health, updated = excluded.updated",
            (fleet, device, health[:200], now),
        )

    def device_status(self, fleet: str) -> dict[str, dict[str, Any]]:
        """device -> {online, last_seen, versions, health, p99} for every device seen or registered."""
        out: dict[str, dict[str, Any]] = {}
        for (d,) in self.query("SELECT device FROM devices WHERE fleet = ?", (fleet,)):
            out[d] = {"online": None, "last_seen": None, "versions": {}, "health": None, "p99": {}}
        for d, online, seen, versions, health, p99 in self.query(
            "SELECT device, online, last_seen, versions, health, p99 FROM device_status WHERE fleet = ?",
            (fleet,),
        ):
            out[d] = {"online": None if online is None else bool(online), "last_seen": seen,
                      "versions": json.loads(versions) if versions else {}, "health": health,
                      "p99": json.loads(p99) if p99 else {}}
        return out

    # -- rollouts -----------------------------------------------------------------------------------
    def create_rollout(self, r: Rollout) -> None:
        """Insert a new rollout; refuses when one is already running or paused for the group and model."""
        with self.transaction():
            busy = self._run("SELECT id FROM rollouts WHERE fleet = ? AND group_name = ? AND model = ?"
                             " AND state IN ('running', 'paused')", (r.fleet, r.group, r.model)).fetchone()
            if busy:
                raise FleetStateError(f"rollout {busy[0]} of {r.model} to group {r.group} is still active",
                                      hint="wait for it, or use 'edgert fleet rollback' / 'pause' first")
            vals = [getattr(r, f) for f in Rollout.__dataclass_fields__]
            vals[7] = json.dumps(list(r.waves))
            marks = ", ".join("?" * len(vals))  # placeholders only: values are bound
            self._run(f"INSERT INTO rollouts VALUES ({marks})", vals)  # noqa: S608

    def rollout(self, rollout_id: str) -> Rollout | None:
        """One rollout by id."""
        rows = self.query("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
        return Rollout.from_row(rows[0]) if rows else None

    def rollouts(self, fleet: str, *, group: str | None = None, model: str | None = None,
                 states: Sequence[str] | None = None) -> list[Rollout]:
        """Rollouts of a fleet, newest first, filtered by group, model and states."""
        sql, params = "SELECT * FROM rollouts WHERE fleet = ?", [fleet]
        for col, val in (("group_name", group), ("model", model)):
            if val is not None:
                sql += f" AND {col} = ?"
                params.append(val)
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            params += list(states)
        return [Rollout.from_row(r) for r in self.query(sql + " ORDER BY created DESC, id DESC", params)]

    def update_rollout(self, rollout_id: str, now: float, **fields: Any) -> None:
        """Set columns of a rollout (names from :class:`Rollout`, ``group`` excluded)."""
        cols = [c for c in fields if c in Rollout.__dataclass_fields__ and c not in ("id", "group", "waves")]
        if len(cols) != len(fields):
            raise ValueError(f"unknown rollout fields: {sorted(set(fields) - set(cols))}")
        sets = ", ".join(f"{c} = ?" for c in [*cols, "updated"])
        # Column names come from the Rollout dataclass (checked above); values are bound.
        self.execute(f"UPDATE rollouts SET {sets} WHERE id = ?",  # noqa: S608
                     [*(fields[c] for c in cols), now, rollout_id])

    def set_rollout_devices(self, rollout_id: str, plan: Sequence[Sequence[str]], now: float) -> None:
        """Record the wave of every device of a rollout (once, at planning)."""
        with self.transaction():
            for i, wave in enumerate(plan):
                for d in wave:
                    self._run("INSERT INTO rollout_devices (rollout, device, wave, updated)"
                              " VALUES (?, ?, ?, ?) ON CONFLICT (rollout, device) DO NOTHING",
                              (rollout_id, d, i, now))

    def rollout_devices(self, rollout_id: str) -> list[dict[str, Any]]:
        """Per-device progress of a rollout, ordered by wave then device."""
        cols = ("device", "wave", "state", "healthy", "reason", "agreement", "latency_ratio", "samples",
                "updated")
        rows = self.query(f"SELECT {', '.join(cols)} FROM rollout_devices"  # noqa: S608 (constant columns)
                          " WHERE rollout = ? ORDER BY wave, device", (rollout_id,))
        out = [dict(zip(cols, r, strict=True)) for r in rows]
        for d in out:
            d["healthy"] = None if d["healthy"] is None else bool(d["healthy"])
        return out

    def record_update(
        self, rollout_id: str, device: str, *, state: str, reason: str | None, now: float
    ) -> bool:
        """Store an update event state for a device of a rollout; False if the device is not in it."""
        healthy = {"healthy": 1, "active": 1, "failed": 0, "rolled-back": 0}.get(state)
        n = self.execute(
            "UPDATE rollout_devices SET state = ?, healthy = COALESCE(?, healthy), reason = ?, updated = ?"
            " WHERE rollout = ? AND device = ?", (state, healthy, reason, now, rollout_id, device))
        return n > 0

    def record_shadow(self, rollout_id: str, device: str, *, agreement: float, latency_ratio: float,
                      samples: int, now: float) -> bool:
        """Store a device's shadow evaluation numbers; False if the device is not in the rollout."""
        n = self.execute("UPDATE rollout_devices SET agreement = ?, latency_ratio = ?, samples = ?,"
                         " updated = ? WHERE rollout = ? AND device = ?",
                         (agreement, latency_ratio, samples, now, rollout_id, device))
        return n > 0

    # -- deployments and events ---------------------------------------------------------------------
    def deployed_version(self, fleet: str, group: str, model: str) -> tuple[str, int] | None:
        """(version, seq) of the group's current desired state for a model, or None."""
        rows = self.query("SELECT version, seq FROM deployments WHERE fleet = ? AND group_name = ?"
                          " AND model = ?", (fleet, group, model))
        return (rows[0][0], int(rows[0][1])) if rows else None

    def set_deployed(
        self, fleet: str, group: str, model: str, version: str, seq: int, rollout: str | None
    ) -> None:
        """Record the group's desired state for a model."""
        self.execute("INSERT INTO deployments (fleet, group_name, model, version, seq, rollout) VALUES"
                     " (?, ?, ?, ?, ?, ?) ON CONFLICT (fleet, group_name, model) DO UPDATE SET"
                     " version = excluded.version, seq = excluded.seq, rollout = excluded.rollout",
                     (fleet, group, model, version, seq, rollout))

    def add_event(self, fleet: str, kind: str, now: float, *, device: str | None = None,
                  rollout: str | None = None, body: Mapping[str, Any] | None = None) -> None:
        """Append to the event log (body cut at MAX_EVENT_BYTES)."""
        text = json.dumps(dict(body or {}), sort_keys=True, default=str)[:MAX_EVENT_BYTES]
        self.execute("INSERT INTO events (fleet, device, rollout, ts, kind, body) VALUES (?, ?, ?, ?, ?, ?)",
                     (fleet, device, rollout, now, kind, text))

    def events(self, fleet: str, *, rollout: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Most recent events, oldest first."""
        sql, params = "SELECT id, device, rollout, ts, kind, body FROM events WHERE fleet = ?", [fleet]
        if rollout is not None:
            sql += " AND rollout = ?"
            params.append(rollout)
        rows = self.query(sql + " ORDER BY id DESC LIMIT ?", [*params, int(limit)])
        return [{"id": r[0], "device": r[1], "rollout": r[2], "ts": r[3], "kind": r[4],
                 "body": json.loads(r[5]) if r[5] else {}} for r in reversed(rows)]


def _is_db_error(exc: BaseException) -> bool:
    if isinstance(exc, sqlite3.Error):
        return True
    mod = type(exc).__module__
    return mod.startswith("psycopg") and type(exc).__name__ != "ProgrammingError"


def _open_sqlite(path: Path) -> FleetDB:
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(path, 0o600)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
    except (OSError, sqlite3.Error) as exc:
        raise FleetStateError(f"cannot open fleet database {path}: {exc}",
                              hint="check the path and that the directory is writable") from None
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves; commit() outside a transaction is a no-op.
    return FleetDB(conn, SQLITE, str(path))


def _open_postgres(url: str) -> FleetDB:
    try:
        import psycopg
    except ImportError:
        raise ConfigError("PostgreSQL fleet state needs psycopg 3",
                          hint="pip install 'edgert[fleet]' (or 'psycopg[binary]>=3.2')") from None
    try:
        conn = psycopg.connect(url, connect_timeout=PG_CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        # The URL may hold a password: never echo it.
        raise FleetStateError(f"cannot connect to the PostgreSQL fleet database: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}",
                              hint="check host, port, database name and credentials of --db") from None
    return FleetDB(conn, POSTGRES, "postgresql://…")


def open_db(url: str | os.PathLike[str]) -> FleetDB:
    """Open (and create the schema of) ``postgresql://…`` / ``postgres://…`` or an SQLite file path."""
    text = os.fspath(url)
    if text.startswith(("postgresql://", "postgres://")):
        db = _open_postgres(text)
    elif "://" in text and not text.startswith("sqlite:///"):
        raise ConfigError(f"unsupported fleet database URL scheme in {text.split('://')[0]!r}",
                          hint="use a file path, sqlite:///path or postgresql://user@host/db")
    else:
        db = _open_sqlite(Path(text.removeprefix("sqlite://")))
    db.create_schema()
    return db


def import_device_records(db: FleetDB, fleet: str, directory: str | os.PathLike[str]) -> int:
    """Register every ``<device>.json`` record of a fleet's ``devices/`` directory (FLEET_CONTRACT)."""
    n = 0
    for path in sorted(Path(directory).glob("*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
            device, groups = rec["device"], rec.get("groups", [])
            if not isinstance(device, str) or not isinstance(groups, list):
                raise TypeError
        except (OSError, ValueError, KeyError, TypeError):
            raise ConfigError(f"device record {path} is not valid",
                              hint='expected {"device": "...", "groups": ["..."], ...}') from None
        db.register_device(fleet, device, [str(g) for g in groups], rec.get("enrolled"))
        n += 1
    return n
