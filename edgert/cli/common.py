"""Small shared pieces of the CLI: JSON output and profile options."""

from __future__ import annotations

import json
from typing import Any

import click


def echo_json(doc: Any) -> None:
    """Print ``doc`` as indented JSON on stdout."""
    click.echo(json.dumps(doc, indent=2, sort_keys=False, default=str))


profile_option = click.option(
    "--profile",
    "profile",
    default="cpu-generic",
    show_default=True,
    help="Device profile name, path to a profile .toml, or 'auto' to detect.",
)
