"""Entry point of the ``edgert`` command: the top-level group and the one place errors become exit codes."""

from __future__ import annotations

import logging
import sys

import click

from edgert import __version__
from edgert.cli.lazy import LazyGroup
from edgert.errors import EdgertError, exit_code_for

#: name -> ("module:click_object", short help). One line per command group; each module owns its group.
COMMANDS = {
    "doctor": (
        "edgert.cli.doctor:doctor",
        "Check packages, backends and providers; detect the device profile.",
    ),
    "profiles": ("edgert.cli.profiles:profiles", "List and show device profiles."),
    "models": ("edgert.cli.models:models", "Inspect model files; manage the encrypted model store."),
    "infer": ("edgert.cli.infer:infer", "Run one inference on a model file."),
    "bench": ("edgert.cli.bench:bench", "Benchmark a model in-process: p50/p90/p99, throughput."),
    "keys": ("edgert.cli.keys:keys", "Create and show this device's keys."),
    "package": ("edgert.cli.package:package", "Create and inspect encrypted model packages (.edgepkg)."),
    "audit": ("edgert.cli.audit:audit", "Verify and read the tamper-evident audit log."),
    "capture": ("edgert.cli.capture:capture", "Sealed data capture (fleet side: open captures)."),
    "config": ("edgert.cli.config_cmd:config", "Print the annotated example daemon config."),
    "daemon": ("edgert.cli.daemon:daemon", "Run the serving daemon (OIP v2 HTTP, Unix socket, MQTT sync)."),
    "demo": ("edgert.cli.daemon:demo", "Run the daemon with the bundled sample models, offline, on CPU."),
    "mqtt": ("edgert.cli.mqtt:mqtt", "Check the MQTT broker connection, TLS and ACLs."),
    "fleet": ("edgert.cli.fleet:fleet", "Fleet side: repository, devices, keys, rollouts, controller."),
    "provision": ("edgert.cli.provision:provision", "Provision devices over a serial cable."),
    "trace": ("edgert.cli.trace:trace", "Follow slow-request traces (per-stage timings) from daemon logs."),
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
    configure_logging(level, explicit=verbose > 0)


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
