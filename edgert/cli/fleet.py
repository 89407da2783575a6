"""``edgert fleet ...``: init, TUF keys, model versions, devices (logic: edgert.fleet)."""

from __future__ import annotations

from pathlib import Path

import click

from edgert.cli.common import echo_json

fleet_option = click.option(
    "--fleet", "fleet_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
    envvar="EDGERT_FLEET", help="The fleet directory (made by 'edgert fleet init'; env EDGERT_FLEET).")


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


@click.group()
def fleet() -> None:
    """Fleet side: the TUF repository of signed model packages, devices and keys."""


@fleet.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--id", "fleet_id", default=None, help="Fleet id (default: the directory name).")
@click.option("--root-threshold", default=1, show_default=True, help="Root signatures a root change needs.")
@click.option("--root-keys", default=1, show_default=True, help="How many root keys to create.")
@click.option("--expires", default=None, metavar="ROLE=DUR,...",
              help="Metadata validity, e.g. root=365d,targets=90d,snapshot=7d,timestamp=1d (the defaults).")
@click.option("--broker-host", default="127.0.0.1", show_default=True, help="MQTT broker host (fleet.toml).")
@click.option("--broker-port", default=1883, show_default=True, help="MQTT broker port (fleet.toml).")
def init_cmd(directory: Path, fleet_id: str | None, root_threshold: int, root_keys: int, expires: str | None,
             broker_host: str, broker_port: int) -> None:
    """Create a fleet in DIRECTORY: TUF keys and metadata, publisher, command, capture, escrow keys, CA."""
    from edgert.fleet.fleetdir import parse_expires
    from edgert.fleet.repo_init import init_fleet

    made = init_fleet(directory, fleet_id=fleet_id, root_threshold=root_threshold, root_keys=root_keys,
                      expires=parse_expires(expires), broker_host=broker_host, broker_port=broker_port)
    click.echo(f"created fleet {made.fleet.id} in {directory} "
               f"(private keys in {made.fleet.keys_dir}, mode 0600)")
    for key, value in made.public.items():
        click.echo(f"  {key}: {value}")
    click.echo("devices pin: the publisher key ('edgert keys trust ed25519:...'), the command public key "
               "file ([mqtt] command_key_file) and the TUF root (1.root.json)")
    click.echo("recommended: move the root key files offline now (keep them together, off this host); pass "
               "--root-keys DIR to 'edgert fleet keys rotate' when you need them:")
    for p in made.root_key_files:
        click.echo(f"  {p}")


@fleet.group("keys")
def keys_group() -> None:
    """TUF role keys."""


@keys_group.command("rotate")
@click.argument("role", type=click.Choice(["root", "targets", "snapshot", "timestamp"]))
@fleet_option
@click.option("--root-keys", "root_key_dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Directory holding offline root key files (repeatable).")
def rotate_cmd(role: str, fleet_dir: Path, root_key_dirs: tuple[Path, ...]) -> None:
    """Replace ROLE's keys through a new root version; devices follow it on their next refresh."""
    from edgert.fleet.fleetdir import FleetDir
    from edgert.fleet.repository import TufRepository

    repo = TufRepository(FleetDir.open(fleet_dir), root_key_dirs=root_key_dirs)
    rotation = repo.rotate(role)
    click.echo(f"rotated {role}: root version {rotation.root_version}; new key(s) "
               f"{', '.join(k[:16] for k in rotation.new_keyids)}; "
               f"retired {len(rotation.retired)} key file(s)")
    if role == "root":
        click.echo("move the new root key files offline:")
        for p in rotation.new_key_files:
            click.echo(f"  {p}")


@fleet.group("model")
def model_group() -> None:
    """Model versions published in the fleet repository."""


@model_group.command("add")
@click.argument("models", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@fleet_option
@click.option("--name", default=None, help="Model name.")
@click.option("--version", "version", default=None, help="Model version (dotted integers).")
@click.option("--variant", "variants", multiple=True,
              help="Variant id per MODEL, in order (default: detected; a clash gets the format as suffix).")
@click.option("--golden", nargs=2, type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="IN.npz OUT.npz: the golden input and output of the device health check.")
@click.option("--groups", default=None, help="Groups whose devices get the package key wrapped (G,G...).")
@click.option("--package", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Publish a ready .edgepkg (signed by the fleet publisher, wrapped for the escrow key).")
@click.option("--json", "as_json", is_flag=True, help="Print the target as JSON.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reference data (.npz): its profile is signed into the package for drift detection.")
def model_add_cmd(models: tuple[Path, ...], fleet_dir: Path, name: str | None, version: str | None,
                  variants: tuple[str, ...], golden: tuple[Path, Path] | None, groups: str | None,
                  package: Path | None, as_json: bool, reference: Path | None) -> None:
    """Build one signed multi-variant package from MODEL files and publish it as a TUF target."""
    from edgert.fleet.fleetdir import FleetDir
    from edgert.fleet.repo_models import add_model

    profile = None
    if reference is not None:
        from edgert.cli.package import reference_profile

        if package is not None or not models:
            from edgert.errors import ConfigError

            raise ConfigError("--reference profiles MODEL files; a ready --package carries its own profile")
        profile = reference_profile(models[0], reference)
    target = add_model(FleetDir.open(fleet_dir), list(models), name=name, version=version,
                       variants=list(variants), groups=_csv(groups), golden=golden or None, package=package,
                       reference=profile)
    if as_json:
        echo_json({"target": target.target, "length": target.length, "sha256": target.sha256,
                   "custom": target.custom})
        return
    variants_text = ", ".join(v["variant"] for v in target.custom["edgert"]["variants"])
    click.echo(f"published {target.target} ({target.length} bytes, sha256 {target.sha256[:16]}...; "
               f"variants {variants_text})")


@model_group.command("list")
@fleet_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def model_list_cmd(fleet_dir: Path, as_json: bool) -> None:
    """List the published model versions."""
    from edgert.fleet.fleetdir import FleetDir
    from edgert.fleet.repo_models import list_models

    found = list_models(FleetDir.open(fleet_dir))
    if as_json:
        echo_json([{"target": m.target, "length": m.length, "sha256": m.sha256, "custom": m.custom}
                   for m in found])
        return
    for m in found:
        variants = ", ".join(v["variant"] for v in m.custom.get("edgert", {}).get("variants", []))
        click.echo(f"{m.name} {m.version}: {m.target}, {m.length} bytes, variants {variants}")


@fleet.group("devices")
def devices_group() -> None:
    """Devices registered with the fleet (the keys packages are wrapped to)."""


@devices_group.command("add")
@click.argument("device")
@fleet_option
@click.option("--groups", required=True, help="Groups the device belongs to (G,G...).")
@click.option("--x25519", "x25519", required=True, metavar="x25519:...",
              help="The device's public key ('edgert keys show' on the device).")
@click.option("--replace", is_flag=True, help="Update a device already registered.")
def devices_add_cmd(device: str, fleet_dir: Path, groups: str, x25519: str, replace: bool) -> None:
    """Register DEVICE with its groups and X25519 key."""
    from edgert.fleet.fleetdir import FleetDir, add_device

    record = add_device(FleetDir.open(fleet_dir), device, groups=_csv(groups), x25519=x25519, replace=replace)
    click.echo(f"registered {record.device} in {', '.join(record.groups)}")


@devices_group.command("list")
@fleet_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices_list_cmd(fleet_dir: Path, as_json: bool) -> None:
    """List registered devices."""
    from edgert.fleet.fleetdir import FleetDir

    records = FleetDir.open(fleet_dir).devices()
    if as_json:
        echo_json([r.to_json() for r in records])
        return
    for r in records:
        click.echo(f"{r.device}: groups {', '.join(r.groups)}, {r.x25519}, enrolled {r.enrolled}")


@fleet.command("serve")
@fleet_option
@click.option("--db", "db_url", envvar="EDGERT_FLEET_DB", default=None,
              help="Fleet state: default DIR/fleet.sqlite; postgresql://… lets several controllers share it.")
@click.option("--controller-id", default=None, help="This replica's name (default: random).")
def serve_cmd(fleet_dir: Path, db_url: str | None, controller_id: str | None) -> None:
    """Run the fleet controller: rollouts, fleet state, and the repository devices fetch over MQTT."""
    from edgert.cli.fleet_rollout import run_controller
    from edgert.fleet.enrollment import EnrollmentHandler
    from edgert.fleet.fleetdir import FleetDir
    from edgert.fleet.service import MetadataKeeper, RepoAttachment

    fd = FleetDir.open(fleet_dir)
    keeper = MetadataKeeper(fd)
    keeper.start()
    try:
        run_controller(fleet=fd.id, db_url=db_url or str(fd.db_path), broker=fd.broker,
                       command_key=str(fd.command_key_path), controller_id=controller_id,
                       devices_dir=str(fd.devices_dir),
                       attachments=[RepoAttachment(fd), EnrollmentHandler(fd)])
    finally:
        keeper.stop()


def _register_rollouts() -> None:
    from edgert.cli.fleet_rollout import register

    register(fleet, serve_command=False)


_register_rollouts()
