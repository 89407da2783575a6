"""Fleet state on SQLite and on a REAL PostgreSQL (Debian's, started here as an unprivileged cluster).

The same tests run on both backends. The lease test uses two controller objects (two connections)
and an injected clock: the first holds the lease, is "killed" (stops renewing), and the second takes
over only once the TTL has passed.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgert.errors import ConfigError
from edgert.fleet.db import FleetDB, FleetStateError, Rollout, import_device_records, open_db
from tests.brokers import broker_missing

PG_START_TIMEOUT_S = 60


def pg_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


class PostgresCluster:
    """initdb + pg_ctl in a private directory, Unix socket only (no TCP), as an unprivileged user."""

    def __init__(self) -> None:
        bindir = pg_bindir()
        if bindir is None:
            broker_missing("PostgreSQL (initdb/pg_ctl)")  # fails instead of skipping in CI
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="edgert-pg-"))
        self.data = self.dir / "data"
        self.port = 50000 + os.getpid() % 10000
        self.user = None if os.getuid() != 0 else "nobody"
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)

    def _run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, timeout=PG_START_TIMEOUT_S, cwd=self.dir)

    def start(self) -> PostgresCluster:
        r = self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-w", "-t",
                      str(PG_START_TIMEOUT_S), "-o",
                      f"-c listen_addresses='' -c unix_socket_directories={self.dir} -p {self.port}", "start")
        assert r.returncode == 0, r.stderr.decode()[-2000:] + (self.dir / "log").read_text()[-2000:]
        return self

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.dir}&port={self.port}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    pytest.importorskip("psycopg")
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield str(tmp_path / "state" / "fleet.sqlite")
        return
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    db = open_db(cluster.url)
    # A fresh database state per test: drop our tables.
    for t in ("meta", "devices", "group_members", "seqs", "rollouts", "rollout_devices", "device_status",
              "deployments", "events", "leases"):
        db.execute(f"DROP TABLE IF EXISTS {t}")
    db.close()
    yield cluster.url


def new_rollout(rid: str = "r1", **kw) -> Rollout:
    base = dict(id=rid, fleet="f1", group="g", model="digits", version="2", previous_version="1",
                kind="deploy", waves=(0.1, 1.0), wait_healthy_s=300.0, max_failure_rate=0.05, min_attempts=10,
                shadow_percent=None, min_agreement=None, max_latency_ratio=None, state="running",
                current_wave=-1, phase="deploy", wave_started=None, reason=None, created=100.0, updated=100.0)
    base.update(kw)
    return Rollout(**base)


def test_lease_single_holder_and_takeover_after_kill(db_url: str) -> None:
    a, b = open_db(db_url), open_db(db_url)  # two controllers, two connections
    try:
        now = 1000.0
        assert a.acquire_lease("ctl-a", 15, now)
        assert not b.acquire_lease("ctl-b", 15, now + 1)
        assert a.acquire_lease("ctl-a", 15, now + 10)  # renewal extends to now+25
        assert not b.acquire_lease("ctl-b", 15, now + 24.9)
        assert b.lease_holder(now + 24.9) == "ctl-a"
        # ctl-a is killed: it renews no more. At expiry ctl-b takes over...
        assert b.acquire_lease("ctl-b", 15, now + 25)
        assert b.lease_holder(now + 25) == "ctl-b"
        # ...and ctl-a, coming back, cannot steal it while ctl-b renews.
        assert not a.acquire_lease("ctl-a", 15, now + 26)
        b.release_lease("ctl-b")
        assert a.acquire_lease("ctl-a", 15, now + 27)
    finally:
        a.close()
        b.close()


def test_rollout_roundtrip_and_one_active_per_group(db_url: str) -> None:
    db = open_db(db_url)
    try:
        db.create_rollout(new_rollout())
        r = db.rollout("r1")
        assert r is not None and r.waves == (0.1, 1.0) and r.state == "running" and r.previous_version == "1"
        with pytest.raises(FleetStateError, match="still active"):
            db.create_rollout(new_rollout("r2"))
        db.update_rollout("r1", 200.0, state="halted", reason="failure rate 2/3")
        r = db.rollout("r1")
        assert r is not None and (r.state, r.reason, r.updated) == ("halted", "failure rate 2/3", 200.0)
        db.create_rollout(new_rollout("r2", created=150.0))
        assert [x.id for x in db.rollouts("f1", group="g")] == ["r2", "r1"]
        assert [x.id for x in db.rollouts("f1", states=["halted"])] == ["r1"]
        db.set_rollout_devices("r2", [["d1"], ["d2", "d3"]], 1.0)
        assert db.record_update("r2", "d2", state="failed", reason="health check", now=2.0)
        assert not db.record_update("r2", "nope", state="failed", reason=None, now=2.0)
        assert db.record_shadow("r2", "d1", agreement=0.99, latency_ratio=1.1, samples=50, now=3.0)
        devs = {d["device"]: d for d in db.rollout_devices("r2")}
        assert devs["d2"]["healthy"] is False and devs["d2"]["wave"] == 1 and devs["d1"]["samples"] == 50
        assert [db.next_seq("f1") for _ in range(3)] == [1, 2, 3]
        assert db.next_seq("f2") == 1
    finally:
        db.close()


def test_status_groups_events(db_url: str, tmp_path: Path) -> None:
    db = open_db(db_url)
    try:
        recs = tmp_path / "devices"
        recs.mkdir()
        (recs / "d1.json").write_text('{"device": "d1", "groups": ["g", "h"], "enrolled": "2026-12-01"}')
        (recs / "d2.json").write_text('{"device": "d2", "groups": ["g"]}')
        assert import_device_records(db, "f1", recs) == 2
        assert db.group_devices("f1", "g") == ["d1", "d2"] and db.group_devices("f1", "h") == ["d1"]
        db.register_device("f1", "d1", ["h"])
        assert db.group_devices("f1", "g") == ["d2"]
        db.record_status("f1", "d1", online=True, versions={"digits": "1"}, now=10.0)
        db.record_status("f1", "d1", online=False, versions=None, now=11.0)  # the will keeps versions
        db.record_telemetry("f1", "d2", p99={"digits": 4e-05}, now=12.0)
        st = db.device_status("f1")
        assert st["d1"]["versions"] == {"digits": "1"} and st["d1"]["online"] is False
        assert st["d2"]["p99"] == {"digits": 4e-05} and st["d2"]["last_seen"] == 12.0
        db.set_deployed("f1", "g", "digits", "2", 7, "r1")
        assert db.deployed_version("f1", "g", "digits") == ("2", 7)
        db.add_event("f1", "halt", 5.0, rollout="r1", body={"reason": "x"})
        assert db.events("f1", rollout="r1")[0]["body"] == {"reason": "x"}
        (recs / "bad.json").write_text("[1]")
        with pytest.raises(ConfigError, match=r"bad\.json"):
            import_device_records(db, "f1", recs)
    finally:
        db.close()


def test_sqlite_file_is_private_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "new" / "fleet.sqlite"
    db = open_db(path)
    db.register_device("f1", "d1", ["g"])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert db.query("PRAGMA journal_mode")[0][0] == "wal"
    assert isinstance(db, FleetDB)
    db.close()


def test_bad_urls_are_explained(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported"):
        open_db("mysql://x/y")
    pytest.importorskip("psycopg")
    with pytest.raises(FleetStateError) as ei:
        open_db(f"postgresql://postgres:s3cret@/nodb?host={tmp_path}&port=1")
    assert "s3cret" not in str(ei.value)


def test_sqlite_two_writers_do_not_fail_on_lock(tmp_path: Path) -> None:
    """Two controllers on one SQLite file: BEGIN IMMEDIATE + busy_timeout serialise them."""
    import threading

    path = tmp_path / "fleet.sqlite"
    dbs = [open_db(path), open_db(path)]
    errors: list[BaseException] = []

    def work(db: FleetDB) -> None:
        try:
            for _ in range(200):
                db.next_seq("f1")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert dbs[0].next_seq("f1") == 401
    for d in dbs:
        d.close()
