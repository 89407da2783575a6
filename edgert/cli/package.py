"""``edgert package create|inspect``: build encrypted .edgepkg packages (fleet side) and read manifests."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import click

from edgert.errors import ConfigError
from edgert.security.atomic import TMP_SUFFIX


def _read_recipients(values: tuple[str, ...], recipients_file: Path | None) -> list[str]:
    texts: list[str] = []
    for value in values:
        path = Path(value)
        texts.append(path.read_text() if not value.startswith("x25519:") and path.is_file() else value)
    if recipients_file is not None:
        try:
            lines = recipients_file.read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"cannot read recipients file {recipients_file}: {exc.strerror}") from exc
        texts += [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]
    return texts


@click.group()
def package() -> None:
    """Create and inspect encrypted model packages (.edgepkg)."""


@package.command("create")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name on the device.")
@click.option("--version", "version", required=True, help="Dotted integers, e.g. 3 or 1.2.0.")
@click.option("--variant", type=click.Choice(["int8", "fp16", "fp32", "edgetpu"]), required=True)
@click.option("--recipient", "recipients", multiple=True, metavar="PUBKEY",
              help="Device X25519 key (x25519:... or a file holding it); repeatable.")
@click.option("--recipients-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="File with one x25519:... key per line (# comments allowed).")
@click.option("--min-edgert", default="0.1.0", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output path (default: NAME-VERSION.edgepkg).")
def create_cmd(model: Path, name: str, version: str, variant: str, recipients: tuple[str, ...],
               recipients_file: Path | None, min_edgert: str, output: Path | None) -> None:
    """Encrypt MODEL for one or many devices."""
    from edgert.security.keys import parse_public_key
    from edgert.security.package import create_package

    keys = [parse_public_key(t) for t in _read_recipients(recipients, recipients_file)]
    output = output or Path(f"{name}-{version}.edgepkg")
    tmp = output.with_name(output.name + TMP_SUFFIX)
    try:
        with open(tmp, "w+b") as out:
            manifest = create_package(model, out, name=name, version=version, variant=variant,
                                      recipients=keys, now=datetime.now(timezone.utc), min_edgert=min_edgert)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()
    click.echo(f"wrote {output}: {manifest.name} {manifest.version} ({manifest.variant}, {manifest.format}) "
               f"for {len(keys)} recipient(s); payload sha256 {manifest.payload_sha256}")


@package.command("inspect")
@click.argument("pkg", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def inspect_cmd(pkg: Path) -> None:
    """Print the manifest and recipients without decrypting."""
    from edgert.security.package import read_header

    with open(pkg, "rb") as f:
        header = read_header(f)
    doc = {"manifest": header.manifest.raw,
           "recipients": [{"recipient": r.get("recipient"), "suite": r.get("suite")}
                          for r in header.recipients]}
    click.echo(json.dumps(doc, indent=2, sort_keys=True))
