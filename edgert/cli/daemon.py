"""``edgert daemon`` (serve a config) and ``edgert demo`` (serve the bundled samples)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import click

from edgert.config import DaemonConfig, load_config, parse_listen
from edgert.errors import ConfigError

__all__ = ["daemon", "demo"]

DEFAULT_CONFIG = "/etc/edgert/edgert.toml"


def _override(cfg: DaemonConfig, http: str | None, socket: str | None) -> DaemonConfig:
    if http is not None:
        if http:
            try:
                parse_listen(http)
            except ValueError as exc:
                raise ConfigError(
                    f"--http {http!r}: {exc}", hint="use HOST:PORT, e.g. 127.0.0.1:8000"
                ) from None
        cfg = dataclasses.replace(cfg, http=dataclasses.replace(cfg.http, listen=http))
    if socket is not None:
        cfg = dataclasses.replace(cfg, socket=dataclasses.replace(cfg.socket, path=socket))
    return cfg


def run_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` on uvloop when installed (measurably faster), else asyncio."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


def _log_level(cfg: DaemonConfig) -> None:
    from edgert.logs import configure_logging, explicit_level

    wanted = getattr(logging, cfg.log_level.upper())
    asked = explicit_level()  # -v on the command line may ask for more; never make it quieter
    configure_logging(min(wanted, asked) if asked is not None else wanted)


@click.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Daemon config file (TOML).",
)
@click.option("--http", default=None, metavar="HOST:PORT", help="Override http.listen ('' disables).")
@click.option("--socket", default=None, metavar="PATH", help="Override socket.path ('' disables).")
@click.option(
    "--check",
    is_flag=True,
    help="Resolve everything the config needs (profile, keys, models, ports, files) without serving.",
)
@click.option("--json", "as_json", is_flag=True, help="With --check: print the findings as JSON.")
def daemon(config_path: str, http: str | None, socket: str | None, check: bool, as_json: bool) -> None:
    """Serve the models of a config file over OIP v2 HTTP and the Unix socket."""
    if check:
        _check(config_path, http, socket, as_json)
        return
    from edgert.device import Daemon

    cfg = _override(load_config(config_path), http, socket)
    _log_level(cfg)
    d = Daemon(cfg, config_path=config_path)
    run_loop(d.run())
    if d.restart_requested:
        # reboot-daemon (MQTT): re-execute in place so systemd keeps tracking the same PID.
        import os
        import sys

        os.execv(sys.executable, [sys.executable, "-m", "edgert.cli.main", *sys.argv[1:]])  # noqa: S606


def _check(config_path: str, http: str | None, socket: str | None, as_json: bool) -> None:
    """Print every finding of edgert.device.check; exit non-zero when any is an error."""
    import json

    from edgert.device.check import ERROR, check_file, has_errors

    findings = check_file(config_path, lambda cfg: _override(cfg, http, socket))
    if as_json:
        click.echo(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for f in findings:
            click.echo(f"{f.status:<8} {f.what:<20} {f.detail}")
            if f.hint and f.status != "ok":
                click.echo(f"{'':<8} {'':<20} hint: {f.hint}")
    if has_errors(findings):
        errors = sum(f.status == ERROR for f in findings)
        raise ConfigError(f"{config_path}: {errors} check(s) failed", hint="see the error lines above")


@click.command()
@click.option(
    "--http", default="127.0.0.1:8000", show_default=True, metavar="HOST:PORT", help="OIP v2 HTTP listener."
)
@click.option(
    "--socket", default=None, metavar="PATH", help="Unix socket (default: in the temporary state dir)."
)
@click.option(
    "--metrics",
    default="127.0.0.1:0",
    show_default=True,
    metavar="HOST:PORT",
    help="Prometheus listener (port 0 picks a free one).",
)
@click.option("--mobilenet", is_flag=True, help="Also serve MobileNetV2 int8.")
def demo(http: str, socket: str | None, metrics: str, mobilenet: bool) -> None:
    """Serve the bundled sample models (encrypted to a fresh device key), offline, on localhost."""
    from edgert.device import Daemon
    from edgert.device.demo import DEMO_MODELS, MOBILENET, build_demo_config, demo_usage, install_demo_store

    root = Path(tempfile.mkdtemp(prefix="edgert-demo-"))
    try:
        install_demo_store(root, [*DEMO_MODELS, *([MOBILENET] if mobilenet else [])])
        cfg = _override(
            build_demo_config(root, http=http, metrics=metrics, mobilenet=mobilenet), http, socket
        )
        _log_level(cfg)

        def ready(d: Daemon) -> None:
            addr = d.addresses
            click.echo(demo_usage(addr.get("http", "-"), addr.get("socket", "-"), addr.get("metrics", "-")))

        run_loop(Daemon(cfg).run(on_ready=ready))
    finally:
        shutil.rmtree(root, ignore_errors=True)
