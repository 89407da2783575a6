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


@provision.group()
def bundle() -> None:
    """Fleet side: make site bundles (broker, CA, TUF root, public keys, a short-lived claim)."""


@bundle.command("create")
@click.option(
    "--fleet", "fleet_dir", required=True, type=click.Path(file_okay=False), help="Fleet directory."
)
@click.option("--groups", required=True, help="Comma-separated groups devices may enroll into.")
@click.option("--expires", default="7d", show_default=True, help="Claim lifetime (45m, 12h, 7d).")
@click.option("--uses", default=50, show_default=True, type=int, help="Devices the claim may enroll.")
@click.option("--telemetry-interval", default=60.0, show_default=True, type=float)
@click.option(
    "--broker",
    default=None,
    metavar="HOST:PORT",
    help="Device listener (mutual TLS, device certificates). Default: fleet.toml [broker].",
)
@click.option(
    "--claim-broker",
    default=None,
    metavar="HOST:PORT",
    help="Claim listener (claim id + secret, enrollment topics only). Default: same as --broker.",
)
@click.option(
    "--broker-ca",
    default=None,
    type=click.Path(dir_okay=False),
    help="CA certificate that signed the broker's server certificate. Default: fleet.toml [broker] ca_file.",
)
@click.option(
    "--claim-tls/--claim-plain",
    default=None,
    help="TLS on the claim listener. Default: TLS when there is a CA.",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Bundle file (0600).")
@click.option("--json", "as_json", is_flag=True)
def bundle_create(
    fleet_dir: str,
    groups: str,
    expires: str,
    uses: int,
    telemetry_interval: float,
    broker: str | None,
    claim_broker: str | None,
    broker_ca: str | None,
    claim_tls: bool | None,
    output: str,
    as_json: bool,
) -> None:
    """Create a claim in the fleet and write a signed site bundle around it."""
    from edgert.fleet.fleetdir import parse_duration
    from edgert.provision.bundle import create_bundle, parse_endpoint, write_bundle

    b = create_bundle(
        fleet_dir,
        groups=[g for g in groups.split(",") if g],
        lifetime=parse_duration(expires),
        uses=uses,
        telemetry_interval=telemetry_interval,
        broker=parse_endpoint(broker, "--broker") if broker else None,
        claim_broker=parse_endpoint(claim_broker, "--claim-broker") if claim_broker else None,
        broker_ca=broker_ca,
        claim_tls=claim_tls,
    )
    write_bundle(b, output)
    doc = {
        "bundle": output,
        "fleet": b.fleet,
        "claim": b.claim_id,
        "groups": list(b.groups),
        "uses": uses,
        "expires": b.expires,
        "broker": b.broker.to_json(),
        "claim_broker": b.claim_broker.to_json(),
        "fleet_key": b.publisher,
    }
    _emit(
        as_json,
        doc,
        f"wrote {output} (fleet {b.fleet}, claim {b.claim_id}, groups {','.join(b.groups)}, "
        f"{uses} uses, expires {b.expires}); keep it private: it holds the claim secret\n"
        f"devices connect to {b.broker.host}:{b.broker.port}, enroll at {b.claim_broker.host}:"
        f"{b.claim_broker.port}\n"
        f"broker password file: mosquitto_passwd -b PASSWD {b.claim_id} '<the claim secret in the bundle>'\n"
        f"signed with the fleet key; technicians check it with --fleet-key {b.publisher}",
    )


@provision.command("broker-setup")
@click.option(
    "--fleet", "fleet_dir", required=True, type=click.Path(file_okay=False), help="Fleet directory."
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    help="Name or address devices reach the broker at (repeat for more; the server certificate's names).",
)
@click.option("--device-port", default=8883, show_default=True, type=int, help="Mutual-TLS device listener.")
@click.option("--claim-port", default=8884, show_default=True, type=int, help="Claim (password) listener.")
@click.option(
    "--install-dir",
    default=None,
    help="Where the files will live on the broker host (paths in mosquitto.conf). Default: OUT.",
)
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="New directory.")
@click.option("--json", "as_json", is_flag=True)
def broker_setup_cmd(
    fleet_dir: str,
    hosts: tuple[str, ...],
    device_port: int,
    claim_port: int,
    install_dir: str | None,
    output: str,
    as_json: bool,
) -> None:
    """Fleet side: certificates, ACLs and mosquitto listeners for devices and enrollment claims."""
    from edgert.fleet.fleetdir import FleetDir
    from edgert.provision.broker_conf import controller_identity
    from edgert.provision.broker_setup import write_broker_setup

    fleet = FleetDir.open(fleet_dir)
    setup = write_broker_setup(
        fleet,
        output,
        hosts=list(hosts),
        device_port=device_port,
        claim_port=claim_port,
        install_dir=install_dir,
    )
    broker = {
        "host": hosts[0],
        "port": device_port,
        "ca_file": str(fleet.public_dir.resolve() / "ca.pem"),
        "cert_file": str(setup.controller_cert.resolve()),
        "key_file": str(setup.controller_key.resolve()),
    }
    doc = {"directory": str(setup.directory), "mosquitto_conf": str(setup.conf), "fleet_toml_broker": broker}
    toml = "\n".join(f"{k} = {json.dumps(v)}" for k, v in broker.items())
    _emit(
        as_json,
        doc,
        f"wrote {setup.directory}: mosquitto.conf (two listeners), broker.crt/key, fleet-ca.pem, "
        f"devices.acl, claims.acl, claims.passwd; controller/ ({controller_identity(fleet.id)}) stays "
        "with the fleet controller\n"
        f"broker host: copy the rest to {setup.files.device_acl.rsplit('/', 1)[0]} (readable by mosquitto) "
        f"and {setup.conf.name} to /etc/mosquitto/conf.d/edgert.conf\n"
        f"fleet controller: set in {fleet.path / 'fleet.toml'}\n[broker]\n{toml}\n"
        f"bundles: edgert provision bundle create --fleet {fleet.path} --broker {hosts[0]}:{device_port} "
        f"--claim-broker {hosts[0]}:{claim_port} --broker-ca {fleet.public_dir / 'ca.pem'} ...",
    )


@provision.group()
def claims() -> None:
    """Fleet side: list and revoke enrollment claims."""


@claims.command("list")
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def claims_list(fleet_dir: str, as_json: bool) -> None:
    """Claims of a fleet with their use counts."""
    from edgert.fleet.enrollment import list_claims
    from edgert.fleet.fleetdir import FleetDir

    rows = [c.to_json() for c in list_claims(FleetDir.open(fleet_dir))]
    for r in rows:
        r.pop("secret_sha256")
    text = "\n".join(
        f"{r['id']}  {r['uses']}/{r['max_uses']}  expires {r['expires']}  "
        f"{'REVOKED' if r['revoked'] else 'active'}  groups {','.join(r['groups'])}"
        for r in rows
    )
    _emit(as_json, rows, text or "no claims")


@claims.command("revoke")
@click.option("--fleet", "fleet_dir", required=True, type=click.Path(file_okay=False))
@click.argument("claim_id")
@click.option("--json", "as_json", is_flag=True)
def claims_revoke(fleet_dir: str, claim_id: str, as_json: bool) -> None:
    """Revoke a claim: no further device can enroll with it."""
    from edgert.fleet.enrollment import revoke_claim
    from edgert.fleet.fleetdir import FleetDir

    c = revoke_claim(FleetDir.open(fleet_dir), claim_id)
    _emit(as_json, {"claim": c.id, "revoked": True}, f"revoked {c.id}")


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
def agent_cmd(port: str, baud: int, state_dir: str | None, config_path: str, profile: str) -> None:
    """Device side: answer the technician on PORT until the device is provisioned."""
    from edgert import paths
    from edgert.provision.agent import Agent, serve
    from edgert.provision.session import open_port

    agent = Agent(paths.state_dir(state_dir), Path(config_path), profile=profile)
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
