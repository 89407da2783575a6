"""``edgert models …``: inspect model files; store commands (list, import, activate, …) load lazily."""

from __future__ import annotations

import hashlib
from pathlib import Path

import click

from edgert.cli.common import echo_json, profile_option
from edgert.cli.lazy import LazyGroup

STORE_COMMANDS = {
    "list": ("edgert.cli.store_cmds:list_cmd", "List models in the store with active/previous versions."),
    "import": ("edgert.cli.store_cmds:import_cmd", "Encrypt a plaintext model to this device and store it."),
    "activate": ("edgert.cli.store_cmds:activate_cmd", "Make a stored version active (reaches the daemon)."),
    "rollback": ("edgert.cli.store_cmds:rollback_cmd", "Go back to the previous version of a model."),
    "remove": ("edgert.cli.store_cmds:remove_cmd", "Remove a model version from the store."),
}


@click.group(cls=LazyGroup, lazy_subcommands=STORE_COMMANDS)
def models() -> None:
    """Inspect model files and manage the device's encrypted model store."""


@models.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@profile_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Also profile the model on this reference data (.npz), as 'package create' would.")
def inspect(file: Path, profile: str, as_json: bool, reference: Path | None) -> None:
    """Show a model's format, variant, size, hash, inputs, outputs and the provider it would run on.

    Quantized TFLite inputs and outputs are listed with the type the model stores them in and
    their scale and zero point (callers pass and receive float32; edgert converts). An .edgepkg
    package is shown without decrypting it, with its signed reference profile.
    """
    from edgert.backends.describe import detect_variant, sniff_format
    from edgert.cli.package import echo_reference, inspect_package, reference_profile, reference_summary
    from edgert.runtime import Runtime, _read_model_file

    if _is_package(file):
        pkg = inspect_package(file)
        if as_json:
            echo_json(pkg)
            return
        m = pkg["manifest"]
        click.echo(f"package:  {file}: {m['name']} {m['version']} (signature "
                   f"{'verifies' if pkg['signature']['verifies'] else 'DOES NOT VERIFY'})")
        for v in pkg["variants"]:
            click.echo(f"variant:  {v['variant']} ({v['format']}, {v['plaintext_size']:,} bytes)")
        echo_reference(pkg["reference"])
        return
    data = _read_model_file(file)
    fmt = sniff_format(data, str(file))
    variant = detect_variant(data, fmt)
    model = Runtime(profile).load(data, name=file.stem, format=fmt)
    doc = model.describe()
    doc.update(
        {
            "file": str(file),
            "variant": variant,
            "size_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "load_ms": round(model.load_seconds * 1000, 2),
            "profile": model.profile.name,
            "skipped": [{"provider": p, "reason": r} for p, r in model.selection.skipped],
        }
    )
    if reference is not None:
        doc["reference"] = reference_summary(reference_profile(file, reference))
    if as_json:
        echo_json(doc)
        return
    click.echo(f"file:     {file}")
    click.echo(f"format:   {doc['format']}")
    click.echo(f"variant:  {variant}")
    click.echo(f"size:     {len(data):,} bytes")
    click.echo(f"sha256:   {doc['sha256']}")
    click.echo(f"provider: {doc['provider']} (profile {doc['profile']}, loaded in {doc['load_ms']} ms)")
    for p, r in model.selection.skipped:
        click.echo(f"  skipped {p}: {r}")
    click.echo("inputs:")
    for spec in model.inputs:
        click.echo(f"  {spec.describe()}")
    click.echo("outputs:")
    for spec in model.outputs:
        click.echo(f"  {spec.describe()}")
    if reference is not None:
        echo_reference(doc["reference"])


def _is_package(file: Path) -> bool:
    """True when ``file`` starts with the .edgepkg magic."""
    from edgert.security.package import MAGIC

    try:
        with open(file, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False
