"""``edgert config example``: the annotated example daemon config shipped with edgert."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["config", "example_config_path"]

#: Where the example config lives among edgert's data (packaging/edgert.toml in a source checkout).
EXAMPLE_NAME = "edgert.toml"


def example_config_path() -> Path:
    """Path of the annotated example daemon config in the installed package (or the checkout)."""
    from edgert._resources import data_dir

    return data_dir("packaging") / EXAMPLE_NAME


@click.group()
def config() -> None:
    """Daemon configuration: the annotated example config (check one with `edgert daemon --check -c FILE`)."""


@config.command("example")
@click.option("--path", "show_path", is_flag=True, help="Print where the example file is, not its text.")
def example(show_path: bool) -> None:
    """Print the annotated example config (the one the Debian package installs as /etc/edgert/edgert.toml)."""
    from edgert.errors import ConfigError

    path = example_config_path()
    if show_path:
        click.echo(str(path))
        return
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"the example config {path} cannot be read: {exc.strerror}",
            hint="reinstall edgert: the example ships in the package as edgert/data/packaging/edgert.toml",
        ) from None
    click.echo(text, nl=False)
