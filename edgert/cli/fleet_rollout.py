"""``edgert fleet deploy|rollback|pause|resume|status|serve``: rollouts. Attach with :func:`register`."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from edgert.cli.common import echo_json

__all__ = ["register"]

F = TypeVar("F", bound=Callable[..., Any])


def fleet_target(func: F) -> F:
    """``--fleet DIR`` (the fleet directory: its id, its fleet.sqlite and devices), or ``--fleet-id``
    and ``--db`` (e.g. a PostgreSQL URL shared by several controllers); the command gets ``fleet`` (the
    id) and ``db_url``."""

    @functools.wraps(func)
    def wrapper(*args: Any, fleet_dir: str | None, fleet_id: str | None, db_url: str | None,
                **kwargs: Any) -> Any:
        fleet, db = resolve_target(fleet_dir, fleet_id, db_url)
        if fleet_dir and "devices_dir" in kwargs and kwargs["devices_dir"] is None:
            from edgert.fleet.fleetdir import FleetDir

            # devices registered since the controller started (`fleet devices add`, provisioning) count
            kwargs["devices_dir"] = str(FleetDir.open(fleet_dir).devices_dir)
        return func(*args, fleet=fleet, db_url=db, **kwargs)

    wrapper = click.option("--db", "db_url", envvar="EDGERT_FLEET_DB", default=None,
                           help="Fleet state: an SQLite file or postgresql://… (default: DIR/fleet.sqlite; "
                                "env EDGERT_FLEET_DB).")(wrapper)
    wrapper = click.option("--fleet-id", "fleet_id", envvar="EDGERT_FLEET_ID", default=None,
                           help="Fleet id (default: the fleet directory's; env EDGERT_FLEET_ID).")(wrapper)
    wrapper = click.option("--fleet", "fleet_dir", envvar="EDGERT_FLEET", default=None,
                           type=click.Path(file_okay=False),
                           help="The fleet directory ('edgert fleet init'; env EDGERT_FLEET).")(wrapper)
    return wrapper  # type: ignore[return-value]


def resolve_target(fleet_dir: str | None, fleet_id: str | None, db_url: str | None) -> tuple[str, str]:
    """(fleet id, db URL) from the fleet directory and/or the explicit options."""
    from edgert.errors import ConfigError

    if fleet_dir:
        from edgert.fleet.fleetdir import FleetDir

        fd = FleetDir.open(fleet_dir)
        return fleet_id or fd.id, db_url or str(fd.db_path)
    if not fleet_id or not db_url:
        raise ConfigError("say which fleet: --fleet DIR, or both --fleet-id and --db",
                          hint="'edgert fleet init DIR' makes a fleet directory")
    return fleet_id, db_url


def _open(db_url: str, devices_dir: str | None = None, fleet: str | None = None) -> Any:
    from edgert.fleet.db import import_device_records, open_db

    db = open_db(db_url)
    if devices_dir and fleet:
        import_device_records(db, fleet, devices_dir)
    return db


@click.command("deploy")
@fleet_target
@click.option("--group", required=True, help="Device group to update.")
@click.option("--model", required=True, help="Model name.")
@click.option("--version", "version", required=True, help="Version to roll out.")
@click.option("--waves", default="1%,10%,50%,100%", show_default=True, help="Cumulative share per wave.")
@click.option(
    "--wait-healthy",
    default="5m",
    show_default=True,
    help="How long a wave waits for its devices to report active (offline ones then time out).",
)
@click.option("--max-failure-rate", default="5%", show_default=True, help="Halt above this failure rate.")
@click.option(
    "--min-attempts",
    default=None,
    type=int,
    help="Judge the failure rate once this many devices have an outcome (default 10).",
)
@click.option("--shadow", default=None, help="Run the new version in shadow first on this share of requests.")
@click.option("--min-agreement", default=None, type=float, help="Shadow gate: lowest agreement to promote.")
@click.option("--max-latency-ratio", default=None, type=float, help="Shadow gate: highest new/old latency.")
@click.option("--device", "devices", multiple=True, help="Add DEVICE to --group first (repeatable).")
@click.option(
    "--devices-dir",
    type=click.Path(file_okay=False, exists=True),
    help="Import the fleet's devices/<device>.json records (groups) first.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the rollout as JSON.")
def deploy(
    fleet: str,
    db_url: str,
    group: str,
    model: str,
    version: str,
    waves: str,
    wait_healthy: str,
    max_failure_rate: str,
    min_attempts: int | None,
    shadow: str | None,
    min_agreement: float | None,
    max_latency_ratio: float | None,
    devices: tuple[str, ...],
    devices_dir: str | None,
    as_json: bool,
) -> None:
    """Record a staged rollout of MODEL VERSION to GROUP; `edgert fleet serve` carries it out."""
    from edgert.fleet.controller import create_rollout
    from edgert.fleet.planner import DEFAULT_MIN_ATTEMPTS, parse_duration, parse_fraction, parse_waves

    db = _open(db_url, devices_dir, fleet)
    try:
        for d in devices:
            current = db.query(
                "SELECT group_name FROM group_members WHERE fleet = ? AND device = ?", (fleet, d)
            )
            db.register_device(fleet, d, sorted({*(row[0] for row in current), group}))
        r = create_rollout(
            db,
            fleet=fleet,
            group=group,
            model=model,
            version=version,
            waves=parse_waves(waves),
            wait_healthy_s=parse_duration(wait_healthy),
            max_failure_rate=parse_fraction(max_failure_rate, "--max-failure-rate"),
            min_attempts=DEFAULT_MIN_ATTEMPTS if min_attempts is None else min_attempts,
            shadow_percent=None if shadow is None else parse_fraction(shadow, "--shadow") * 100.0,
            min_agreement=min_agreement,
            max_latency_ratio=max_latency_ratio,
            now=time.time(),
        )
        n = len(db.group_devices(fleet, group))
    finally:
        db.close()
    if as_json:
        echo_json(
            {
                "rollout": r.id,
                "group": group,
                "model": model,
                "version": version,
                "devices": n,
                "previous_version": r.previous_version,
            }
        )
    else:
        click.echo(
            f"rollout {r.id}: {model} {version} to group {group} ({n} devices), waves {waves}"
            + (f", previous version {r.previous_version}" if r.previous_version else "")
        )


@click.command("rollback")
@fleet_target
@click.option("--group", required=True)
@click.option("--model", required=True)
def rollback(fleet: str, db_url: str, group: str, model: str) -> None:
    """Stop the group's latest rollout of MODEL and go back to the version before it."""
    from edgert.fleet.controller import request_rollback

    db = _open(db_url)
    try:
        r = request_rollback(db, fleet=fleet, group=group, model=model, now=time.time())
    finally:
        db.close()
    click.echo(f"rollback {r.id}: {model} back to {r.version} on group {group}")


def _pause_cmd(name: str, paused: bool) -> click.Command:
    @click.command(name)
    @fleet_target
    @click.option("--group", required=True)
    @click.option("--model", default=None, help="Only the rollout of this model.")
    def cmd(fleet: str, db_url: str, group: str, model: str | None) -> None:
        from edgert.fleet.controller import set_paused

        db = _open(db_url)
        try:
            ids = set_paused(db, fleet=fleet, group=group, model=model, paused=paused, now=time.time())
        finally:
            db.close()
        click.echo(f"{'paused' if paused else 'resumed'}: {', '.join(ids)}")

    cmd.help = (
        "Pause the group's running rollouts (no wave advances, nothing halts)."
        if paused
        else "Resume paused rollouts; the current wave's wait starts again."
    )
    return cmd


def status_report(db: Any, fleet: str, group: str | None, now: float) -> dict[str, Any]:
    """Per-device versions, health, last seen, p99 and per-rollout wave progress (the --json shape)."""
    rollouts = db.rollouts(fleet, group=group)
    members = set(db.group_devices(fleet, group)) if group else None
    status = db.device_status(fleet)
    out_r = []
    for r in rollouts[:10]:
        rows = db.rollout_devices(r.id)
        waves: dict[int, dict[str, int]] = {}
        for x in rows:
            w = waves.setdefault(x["wave"], {"devices": 0, "active": 0, "failed": 0})
            w["devices"] += 1
            w["active"] += x["state"] == "active"
            w["failed"] += x["state"] in ("failed", "rolled-back")
        out_r.append(
            {
                "id": r.id,
                "kind": r.kind,
                "group": r.group,
                "model": r.model,
                "version": r.version,
                "state": r.state,
                "reason": r.reason,
                "phase": r.phase,
                "wave": r.current_wave,
                "waves": [waves[k] for k in sorted(waves)],
                "created": r.created,
            }
        )
    devices = {}
    for d, s in sorted(status.items()):
        if members is None or d in members:
            devices[d] = {**s, "age_s": None if s["last_seen"] is None else round(now - s["last_seen"], 1)}
    return {"fleet": fleet, "group": group, "rollouts": out_r, "devices": devices}


def _print_status(rep: dict[str, Any]) -> None:
    for r in rep["rollouts"]:
        rep_waves = r["waves"]
        prog = " ".join(
            f"[{i}:{w['active']}/{w['devices']}{'!' + str(w['failed']) if w['failed'] else ''}]"
            for i, w in enumerate(rep_waves)
        )
        click.echo(
            f"{r['id']:<32} {r['kind']:<8} {r['group']:<12} {r['model']} {r['version']:<8} "
            f"{r['state']:<11} wave {r['wave'] + 1}/{len(rep_waves)} {r['phase']:<7} {prog}"
            + (f"  reason: {r['reason']}" if r["reason"] else "")
        )
    click.echo(f"{'device':<24} {'online':<7} {'last seen':>10} {'health':<22} {'p99 ms':>8}  versions")
    for d, s in rep["devices"].items():
        p99 = [v for v in s["p99"].values() if v is not None]
        click.echo(
            f"{d:<24} {s['online']!s:<7} {_age(s['age_s']):>10} {str(s['health'] or '-')[:22]:<22} "
            f"{max(p99) * 1000 if p99 else float('nan'):>8.2f}  "
            + " ".join(f"{m}={v}" for m, v in sorted(s["versions"].items()))
        )


def _age(age: float | None) -> str:
    return "-" if age is None else f"{age:.0f}s ago"


@click.command("status")
@fleet_target
@click.option("--group", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", default=None, type=float, help="Redraw every N seconds (live display).")
def status(fleet: str, db_url: str, group: str | None, as_json: bool, watch: float | None) -> None:
    """Devices (versions, health, last seen, p99) and rollout wave progress."""
    db = _open(db_url)
    try:
        while True:
            rep = status_report(db, fleet, group, time.time())
            if as_json:
                click.echo(json.dumps(rep, default=str))
            else:
                if watch:
                    click.clear()
                _print_status(rep)
            if not watch:
                return
            time.sleep(watch)
    finally:
        db.close()


@click.command("serve")
@fleet_target
@click.option("--host", default="127.0.0.1", show_default=True, help="MQTT broker host.")
@click.option("--port", default=None, type=int, help="MQTT broker port (1883, or 8883 with --ca-file).")
@click.option("--ca-file", default=None)
@click.option("--cert-file", default=None)
@click.option("--key-file", default=None)
@click.option("--username", default=None)
@click.option("--password-file", default=None)
@click.option(
    "--command-key",
    required=True,
    type=click.Path(dir_okay=False),
    help="The fleet command private key (Ed25519 PEM, mode 0600): signs desired states.",
)
@click.option("--controller-id", default=None, help="This replica's name (default: random).")
@click.option(
    "--devices-dir",
    type=click.Path(file_okay=False, exists=True),
    help="Import the fleet's devices/<device>.json records at start.",
)
def serve(
    fleet: str,
    db_url: str,
    host: str,
    port: int | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    username: str | None,
    password_file: str | None,
    command_key: str,
    controller_id: str | None,
    devices_dir: str | None,
) -> None:
    """Run the rollout controller: ingest device messages, run waves, auto-halt (until Ctrl-C)."""
    from edgert.mqtt.config import BrokerConfig

    raw = {
        k: v
        for k, v in {
            "host": host,
            "port": port,
            "ca_file": ca_file,
            "cert_file": cert_file,
            "key_file": key_file,
            "username": username,
            "password_file": password_file,
        }.items()
        if v is not None
    }
    broker = BrokerConfig.from_dict(
        raw, "command line", prefix="broker", default_client_id=f"edgert-fleet-{controller_id or fleet}"
    )
    run_controller(
        fleet=fleet,
        db_url=db_url,
        broker=broker,
        command_key=command_key,
        controller_id=controller_id,
        devices_dir=devices_dir,
    )


def run_controller(
    *,
    fleet: str,
    db_url: str,
    broker: Any,
    command_key: str,
    controller_id: str | None = None,
    devices_dir: str | None = None,
    attachments: Any = (),
    on_ready: Callable[[Any], None] | None = None,
) -> None:
    """Run the rollout ControllerService until Ctrl-C (another `serve` command may reuse this)."""
    from edgert.fleet.controller import ControllerService, ControllerSettings
    from edgert.mqtt.signing import load_private_key

    key = load_private_key(command_key)
    db = _open(db_url, devices_dir, fleet)
    settings = ControllerSettings(fleet=fleet)
    if controller_id:
        settings = ControllerSettings(fleet=fleet, controller_id=controller_id)
    svc = ControllerService(settings, db, key, broker, attachments=attachments)
    svc.start()
    click.echo(
        f"controller {settings.controller_id} for fleet {fleet} on {broker.host}:{broker.port}", err=True
    )
    if on_ready:
        on_ready(svc)
    try:
        svc.run()
    except KeyboardInterrupt:
        pass
    finally:
        svc.stop()
        db.close()


def register(group: click.Group, *, serve_command: bool = True) -> None:
    """Add deploy, rollback, pause, resume, status (and serve, unless the group has its own) to ``group``."""
    for cmd in (deploy, rollback, _pause_cmd("pause", True), _pause_cmd("resume", False), status):
        group.add_command(cmd)
    if serve_command:
        group.add_command(serve)
