"""``edgert provision`` fleet-side commands: site bundles, the broker setup, and claims."""

from __future__ import annotations

import json
from typing import Any

import click

__all__ = ["register"]


def _emit(as_json: bool, doc: Any, text: str) -> None:
    click.echo(json.dumps(doc, indent=2, default=str) if as_json else text)


@click.group()
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
@click.option(
    "--claim-passwords",
    default=None,
    type=click.Path(dir_okay=False),
    help="Add the claim to this mosquitto password file (then: systemctl reload mosquitto).",
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
    claim_passwords: str | None,
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
    if claim_passwords:
        from edgert.provision.broker_setup import set_claim_password

        set_claim_password(claim_passwords, b.claim_id, b.claim_secret)
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
        + (
            f"added {b.claim_id} to {claim_passwords}: reload the broker (systemctl reload mosquitto)\n"
            if claim_passwords
            else "the broker does not know this claim yet: pass --claim-passwords FILE\n"
        )
        + f"signed with the fleet key; technicians check it with --fleet-key {b.publisher}",
    )


@click.command("broker-setup")
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


@click.group()
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
@click.option(
    "--claim-passwords",
    default=None,
    type=click.Path(dir_okay=False),
    help="Also remove the claim from this mosquitto password file (then: systemctl reload mosquitto).",
)
@click.option("--json", "as_json", is_flag=True)
def claims_revoke(fleet_dir: str, claim_id: str, claim_passwords: str | None, as_json: bool) -> None:
    """Revoke a claim: no further device can enroll with it."""
    from edgert.fleet.enrollment import revoke_claim
    from edgert.fleet.fleetdir import FleetDir

    c = revoke_claim(FleetDir.open(fleet_dir), claim_id)
    if claim_passwords:
        from edgert.provision.broker_setup import set_claim_password

        set_claim_password(claim_passwords, c.id, None)
    _emit(as_json, {"claim": c.id, "revoked": True}, f"revoked {c.id}")


def register(group: click.Group) -> None:
    """Add ``bundle``, ``broker-setup`` and ``claims`` to the ``provision`` group."""
    for cmd in (bundle, broker_setup_cmd, claims):
        group.add_command(cmd)
