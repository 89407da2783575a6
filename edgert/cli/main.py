"""Entry point of the ``edgert`` command: the top-level group and the one place errors become exit codes."""

from __future__ import annotations

import logging
import sys

import click

from edgert import __version__
from edgert.cli.lazy import LazyGroup
from edgert.errors import EdgertError, exit_code_for

#: name -> "module:click-object". One line per command group; each module owns its group.
COMMANDS = {
    "doctor": "edgert.cli.doctor:doctor",
    "profiles": "edgert.cli.profiles:profiles",
    "models": "edgert.cli.models:models",
    "infer": "edgert.cli.infer:infer",
    "bench": "edgert.cli.bench:bench",
    "keys": "edgert.cli.keys:keys",
    "package": "edgert.cli.package:package",
    "audit": "edgert.cli.audit:audit",
    "capture": "edgert.cli.capture:capture",
    "daemon": "edgert.cli.daemon:daemon",
    "demo": "edgert.cli.daemon:demo",
    "mqtt": "edgert.cli.mqtt:mqtt",
}


@click.group(
    cls=LazyGroup,
    lazy_subcommands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="edgert")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """edgert: run encrypted ML models on edge devices and keep them in sync with the fleet."""
    from edgert.logs import configure_logging

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    configure_logging(level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one line on stderr and exit non-zero, never a traceback."""
    try:
        cli.main(args=argv, prog_name="edgert", standalone_mode=False)
    except EdgertError as exc:
        click.echo(f"error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"hint: {exc.hint}", err=True)
        return exit_code_for(exc)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
