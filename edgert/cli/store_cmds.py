"""``edgert models list|activate|rollback|remove|import``: the encrypted model store.

``activate`` and ``rollback`` also tell a running daemon (over its Unix socket) to hot-swap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from edgert.cli.keys import resolve_root, state_dir_option
from edgert.security.store import ModelStore

if TYPE_CHECKING:
    from edgert.config import DaemonConfig

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def _open(state_dir: Path | None) -> Iterator[ModelStore]:
    from edgert.security.loader import open_audit, open_keystore, open_store

    root = resolve_root(state_dir)
    keys = open_keystore(root)
    with open_audit(root, keys) as audit:
        yield open_store(root, keys, audit)


@click.command("list")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(state_dir: Path | None, as_json: bool) -> None:
    """List models in the encrypted store with active/previous versions."""
    with _open(state_dir) as store:
        entries = store.entries()
    if as_json:
        click.echo(json.dumps([e.__dict__ for e in entries], indent=2))
        return
    click.echo(f"{'NAME':24} {'ACTIVE':10} {'PREVIOUS':10} {'HIGHEST':10} INSTALLED")
    for e in entries:
        click.echo(f"{e.name:24} {e.active or '-':10} {e.previous or '-':10} {e.highest or '-':10} "
                   f"{','.join(e.installed) or '-'}")


#: Where the daemon's config lives when --config is not given (used only if it exists).
DEFAULT_DAEMON_CONFIG = Path("/etc/edgert/edgert.toml")


def daemon_options(func: F) -> F:
    """``--socket`` and ``--config``: which running daemon to tell about a store change."""
    func = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=None,
                        help=f"Daemon config: its socket and state dir (default {DEFAULT_DAEMON_CONFIG} "
                             "if it exists).")(func)
    return click.option("--socket", "socket_path", default=None,
                        help="Daemon socket to notify (default: from the daemon config).")(func)


def _daemon_config(config_path: Path | None) -> DaemonConfig | None:
    from edgert.config import load_config

    if config_path is None and DEFAULT_DAEMON_CONFIG.is_file():
        config_path = DEFAULT_DAEMON_CONFIG
    return load_config(config_path) if config_path is not None else None


def _root(state_dir: Path | None, cfg: DaemonConfig | None) -> Path | None:
    """--state-dir, else the daemon config's state dir (CLI and daemon must share one store)."""
    if state_dir is None and cfg is not None and cfg.state_dir:
        return Path(cfg.state_dir)
    return state_dir


def _notify_daemon(name: str, version: str, socket_path: str | None, cfg: DaemonConfig | None) -> None:
    """Ask the running daemon to serve ``version``; say clearly what happened."""
    from edgert.client import notify_daemon_activate
    from edgert.config import DEFAULT_SOCKET_PATH
    from edgert.errors import EdgertError, ServeError, UnknownModelError

    sock = socket_path or (cfg.socket.path if cfg is not None else DEFAULT_SOCKET_PATH)
    if not sock:
        click.echo("the daemon config disables its socket; restart the daemon to serve the new version")
        return
    try:
        reached = notify_daemon_activate(name, version, socket=sock)
    except UnknownModelError:
        click.echo(f"the daemon at {sock} does not serve {name}; the store change applies when it does")
        return
    except EdgertError as exc:
        raise ServeError(
            f"the store now has {name} {version} active, but the running daemon could not load it and "
            f"keeps serving the previous version: {exc.message}",
            hint=f"fix the cause and run 'edgert models activate {name} {version}' again, or run "
                 f"'edgert models rollback {name}' so the store matches what the daemon serves",
        ) from None
    if reached:
        click.echo(f"the daemon at {sock} now serves {name} {version}")
    else:
        click.echo(f"no daemon listening on {sock}; {name} {version} is served when it starts")


@click.command("activate")
@click.argument("name")
@click.argument("version")
@click.option("--allow-downgrade", is_flag=True, help="Activate a version below the highest installed.")
@state_dir_option
@daemon_options
def activate_cmd(name: str, version: str, allow_downgrade: bool, state_dir: Path | None,
                 socket_path: str | None, config_path: Path | None) -> None:
    """Make an installed VERSION of NAME active, then hot-swap it in the running daemon."""
    cfg = _daemon_config(config_path)
    with _open(_root(state_dir, cfg)) as store:
        store.activate(name, version, allow_downgrade=allow_downgrade)
    click.echo(f"{name} {version} is active")
    _notify_daemon(name, version, socket_path, cfg)


@click.command("rollback")
@click.argument("name")
@state_dir_option
@daemon_options
def rollback_cmd(name: str, state_dir: Path | None, socket_path: str | None,
                 config_path: Path | None) -> None:
    """Swap NAME's active and previous versions, then hot-swap the running daemon."""
    cfg = _daemon_config(config_path)
    with _open(_root(state_dir, cfg)) as store:
        version = store.rollback(name)
    click.echo(f"{name} rolled back to {version}")
    _notify_daemon(name, version, socket_path, cfg)


@click.command("remove")
@click.argument("name")
@click.argument("version", required=False)
@click.option("--force", is_flag=True, help="Also remove the active version.")
@state_dir_option
def remove_cmd(name: str, version: str | None, force: bool, state_dir: Path | None) -> None:
    """Remove VERSION of NAME (all versions if omitted); the anti-rollback counter stays."""
    with _open(state_dir) as store:
        removed = store.remove(name, version, force=force)
    click.echo(f"removed {name} {', '.join(removed)}")


@click.command("import")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name (default: file stem; only with one file).")
@click.option("--version", "version", default="1", show_default=True)
@click.option("--variant", type=click.Choice(["int8", "fp16", "fp32", "edgetpu"]), default=None)
@click.option("--package", "is_package", is_flag=True, help="FILES are .edgepkg packages to install as is.")
@click.option("--allow-downgrade", is_flag=True, help="Install a version below the highest installed.")
@click.option("--shred", is_flag=True,
               help="Overwrite and delete the plaintext source (best effort on flash).")
@state_dir_option
def import_cmd(files: tuple[Path, ...], name: str | None, version: str, variant: str | None, is_package: bool,
               allow_downgrade: bool, shred: bool, state_dir: Path | None) -> None:
    """Encrypt plaintext model FILES to this device's key and store them (or install .edgepkg files)."""
    from edgert.errors import ConfigError
    from edgert.security.loader import import_model

    if name and len(files) > 1:
        raise ConfigError("--name works with one file only")
    with _open(state_dir) as store:
        for f in files:
            if is_package or f.suffix == ".edgepkg":
                m = store.install(f, allow_downgrade=allow_downgrade)
            else:
                m = import_model(store, f, name=name, version=version, variant=variant, shred_source=shred,
                                 allow_downgrade=allow_downgrade)
            click.echo(f"imported {m.name} {m.version} ({m.variant}, {m.format}); active")
