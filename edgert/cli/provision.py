"""``edgert provision``: technician commands (bundle, device, info, ports, local) and the device agent."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from edgert.provision.session import DEFAULT_BAUD

DEFAULT_CONFIG = "/etc/edgert/edgert.toml"


def _emit(as_json: bool, doc: Any, text: str) -> None:
    click.echo(json.dumps(doc, indent=2, default=str) if as_json else text)


@click.group()
def provision() -> None:
    """Bring a factory-fresh device into the fleet over a serial cable (docs/provisioning.md)."""


def _port_opts(f: Any) -> Any:
    f = click.option("--baud", default=DEFAULT_BAUD, show_default=True, type=int)(f)
    return click.option(
        "--port", required=True, help="Serial port or pyserial URL (/dev/ttyUSB0, socket://h:p)."
    )(f)


@provision.command("info")
@_port_opts
@click.option("--json", "as_json", is_flag=True)
def info_cmd(port: str, baud: int, as_json: bool) -> None:
    """Ask the device's agent who it is and what was already done."""
    from edgert.provision.session import HostSession, open_port

    with open_port(port, baud) as p:
        host = HostSession(p, baud=baud)
        host.hello()
        doc = host.request("info")
    lines = [f"{k:<12} {v}" for k, v in doc.items() if k not in ("fingerprints", "steps")]
    lines += [f"{k:<12} {v}" for k, v in doc.get("fingerprints", {}).items()]
    _emit(as_json, doc, "\n".join(lines))


@provision.command("ports")
@click.option("--json", "as_json", is_flag=True)
def ports_cmd(as_json: bool) -> None:
    """List serial ports with USB vendor and product."""
    from serial.tools import list_ports

    rows = [
        {
            "device": p.device,
            "description": p.description,
            "vid": f"{p.vid:04x}" if p.vid else None,
            "pid": f"{p.pid:04x}" if p.pid else None,
            "manufacturer": p.manufacturer,
            "product": p.product,
            "serial_number": p.serial_number,
        }
        for p in sorted(list_ports.comports(), key=lambda p: p.device)
    ]
    text = "\n".join(
        f"{r['device']:<16} {r['vid'] or '----'}:{r['pid'] or '----'}  {r['manufacturer'] or ''} "
        f"{r['product'] or r['description'] or ''}".rstrip()
        for r in rows
    )
    _emit(as_json, rows, text or "no serial ports found (is the USB-serial cable plugged in?)")


def _flow_output(as_json: bool, report: Any) -> None:
    doc = asdict(report)
    if as_json:
        click.echo(json.dumps(doc, indent=2, default=str))
        return
    click.echo("")
    click.echo(f"device id         {report.device_id}")
    for k, v in report.fingerprints.items():
        click.echo(f"{k:<17} {v}")
    click.echo(f"certificate       {report.cert_fingerprint or 'not enrolled yet'}")
    lat = (
        f"{report.selftest_latency_ms} ms on {report.provider}"
        if report.selftest_latency_ms is not None
        else "-"
    )
    click.echo(f"selftest latency  {lat}")
    reach = {True: "yes", False: "no", None: "not checked"}[report.broker_reachable]
    cred = {"device": " (device certificate)", "claim": " (enrollment claim)"}.get(
        report.broker_credential or "", ""
    )
    click.echo(f"broker reachable  {reach}{cred if report.broker_reachable is not None else ''}")
    if report.installed:
        rate = report.transfer_bytes / report.transfer_seconds if report.transfer_seconds else 0
        click.echo(f"installed         {report.installed} ({report.transfer_bytes} bytes at {rate:,.0f} B/s)")
    click.echo(f"done in {report.seconds:.1f} s ({report.resends} resends)")


def _hooks(as_json: bool) -> tuple[Any, Any]:
    def on_step(step: str, phase: str, detail: dict[str, Any]) -> None:
        if as_json:
            return
        if phase == "start":
            click.echo(f"  {step:<10} ...", nl=False, err=True)
        elif phase == "ok":
            click.echo(" ok", err=True)
        else:
            click.echo(" FAILED", err=True)

    last = [-1]

    def progress(done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        if not as_json and pct // 5 != last[0] // 5:
            last[0] = pct
            bar = "#" * (pct // 5)
            click.echo(f"\r  install    [{bar:<20}] {pct:3d}% {done}/{total} bytes", nl=False, err=True)
            if done >= total:
                click.echo("", err=True)

    return on_step, progress


def _fleet_key_opt(f: Any) -> Any:
    return click.option(
        "--fleet-key",
        envvar="EDGERT_FLEET_KEY",
        required=True,
        help="The fleet key you trust ('ed25519:...' or a file holding it; env EDGERT_FLEET_KEY): "
        "the bundle must be signed with it.",
    )(f)


def _load_trusted_bundle(bundle_path: str, fleet_key: str) -> Any:
    from edgert.provision.bundle import load_bundle, parse_fleet_key

    return load_bundle(bundle_path, trusted=parse_fleet_key(fleet_key), now=datetime.now(timezone.utc))


@provision.command("device")
@_port_opts
@click.option("--bundle", "bundle_path", required=True, type=click.Path(dir_okay=False))
@_fleet_key_opt
@click.option("--device-id", default=None, help="Default: the id the device reports (serial or hostname).")
@click.option("--groups", default=None, help="Subset of the bundle's groups (comma-separated).")
@click.option(
    "--package", type=click.Path(dir_okay=False), default=None, help="A signed .edgepkg to install."
)
@click.option("--no-finish", is_flag=True, help="Leave provisioning unlocked (for a later step).")
@click.option("--json", "as_json", is_flag=True)
def device_cmd(
    port: str,
    baud: int,
    bundle_path: str,
    fleet_key: str,
    device_id: str | None,
    groups: str | None,
    package: str | None,
    no_finish: bool,
    as_json: bool,
) -> None:
    """Run the whole flow: info, keys, configure, enroll, selftest, [install], finish."""
    from edgert.provision.session import HostSession, open_port
    from edgert.provision.technician import run_flow

    b = _load_trusted_bundle(bundle_path, fleet_key)
    on_step, progress = _hooks(as_json)
    with open_port(port, baud) as p:
        report = run_flow(
            HostSession(p, baud=baud),
            b,
            device_id=device_id,
            groups=groups.split(",") if groups else None,
            package=Path(package) if package else None,
            finish=not no_finish,
            on_step=on_step,
            progress=progress,
        )
    _flow_output(as_json, report)


@provision.command("local")
@click.option("--bundle", "bundle_path", required=True, type=click.Path(dir_okay=False))
@_fleet_key_opt
@click.option("--device-id", default=None)
@click.option("--state-dir", default=None, type=click.Path(file_okay=False))
@click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False)
)
@click.option("--package", type=click.Path(dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
def local_cmd(
    bundle_path: str,
    fleet_key: str,
    device_id: str | None,
    state_dir: str | None,
    config_path: str,
    package: str | None,
    as_json: bool,
) -> None:
    """The same flow on the device itself, without a cable (an in-memory link to the agent)."""
    from edgert import paths
    from edgert.provision.agent import Agent
    from edgert.provision.local import LocalPort
    from edgert.provision.session import HostSession
    from edgert.provision.technician import run_flow

    b = _load_trusted_bundle(bundle_path, fleet_key)
    agent = Agent(paths.state_dir(state_dir), Path(config_path))
    on_step, progress = _hooks(as_json)
    report = run_flow(
        HostSession(LocalPort(agent)),
        b,
        device_id=device_id,
        package=Path(package) if package else None,
        on_step=on_step,
        progress=progress,
    )
    _flow_output(as_json, report)


@provision.command("agent")
@_port_opts
@click.option("--state-dir", default=None, type=click.Path(file_okay=False))
@click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False)
)
@click.option("--profile", default="auto", show_default=True)
@click.option(
    "--fleet-key",
    default=None,
    envvar="EDGERT_FLEET_KEY",
    help="Fleet key pinned in the image ('ed25519:...' or a file): only bundles it signed are accepted.",
)
def agent_cmd(
    port: str, baud: int, state_dir: str | None, config_path: str, profile: str, fleet_key: str | None
) -> None:
    """Device side: answer the technician on PORT until the device is provisioned."""
    from edgert import paths
    from edgert.provision.agent import Agent, serve
    from edgert.provision.bundle import parse_fleet_key
    from edgert.provision.session import open_port

    pinned = parse_fleet_key(fleet_key) if fleet_key else None
    agent = Agent(paths.state_dir(state_dir), Path(config_path), profile=profile, fleet_key=pinned)
    if agent.state().get("locked"):
        click.echo(
            f"device {agent.state().get('device_id')} is already provisioned; nothing to do "
            "(factory reset: 'edgert provision factory-reset --yes')",
            err=True,
        )
        return
    with open_port(port, baud) as p:
        click.echo(f"provisioning agent ready on {port} at {baud} baud", err=True)
        serve(p, agent)
    click.echo("provisioned; agent stopped", err=True)


@provision.command("factory-reset")
@click.option("--state-dir", default=None, type=click.Path(file_okay=False))
@click.option(
    "--config", "config_path", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False)
)
@click.option(
    "--wipe-keys", is_flag=True, help="Also delete the device keys (installed models become unreadable)."
)
@click.option("--yes", is_flag=True, help="Confirm.")
def factory_reset_cmd(state_dir: str | None, config_path: str, wipe_keys: bool, yes: bool) -> None:
    """Unlock provisioning and remove its config and fleet material (recorded in the audit log)."""
    from edgert import paths
    from edgert.errors import ConfigError
    from edgert.provision.agent import factory_reset

    if not yes:
        raise ConfigError("factory reset needs --yes", hint="it removes the config and the fleet enrollment")
    factory_reset(paths.state_dir(state_dir), Path(config_path), wipe_keys=wipe_keys)
    click.echo("factory reset done; run 'edgert provision agent' to provision again")


def _register_fleet_side() -> None:
    from edgert.cli.provision_fleet import register

    register(provision)


_register_fleet_side()
