"""``edgert profiles list|show``."""

from __future__ import annotations

import click

from edgert.cli.common import echo_json


@click.group()
def profiles() -> None:
    """Device profiles: which providers and delegates edgert tries on each hardware class."""


@profiles.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_profiles(as_json: bool) -> None:
    """List the installed device profiles; files that cannot be used are named on stderr."""
    from edgert.profiles import scan_profiles

    found, problems = scan_profiles()
    for problem in problems:
        for line in problem.lines():
            click.echo(f"warning: skipped profile file: {line}", err=True)
    if problems:
        click.echo("hint: fix or remove those files; see device_profiles/README.md for the schema", err=True)
    if as_json:
        echo_json(
            [{"name": p.name, "description": p.description, "source": p.source} for p in found.values()]
        )
        return
    width = max((len(n) for n in found), default=10)
    for name in sorted(found):
        click.echo(f"{name:<{width}}  {found[name].description}")


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def show_profile(name: str, as_json: bool) -> None:
    """Show one profile: detection hints, providers, delegates, variants and limits."""
    from dataclasses import asdict

    from edgert.profiles import load_profile

    p = load_profile(name)
    if as_json:
        echo_json(asdict(p))
        return
    click.echo(f"name:        {p.name}")
    click.echo(f"description: {p.description}")
    click.echo(f"source:      {p.source}")
    click.echo(f"threads:     {p.threads or 'auto'}")
    click.echo(f"variants:    {', '.join(p.variants)}")
    click.echo(f"engine cache: {p.engine_cache}")
    click.echo("onnxruntime providers (in order):")
    for spec in p.providers:
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.items())
        click.echo(f"  - {spec.display}" + (f"  ({opts})" if opts else ""))
    if p.delegates:
        click.echo("LiteRT delegates (in order, CPU last):")
        for d in p.delegates:
            click.echo(f"  - {d.name}: {d.library}")
    click.echo(
        f"limits:      max_batch={p.limits.max_batch} max_in_flight={p.limits.max_in_flight} "
        f"max_queue={p.limits.max_queue}"
    )
