"""``edgert models list|activate|rollback|remove|import``: the encrypted model store.

``import``, ``activate`` and ``rollback`` never move the store's active pointer themselves: they go
through the Deployer (:mod:`edgert.device.control`), in the running daemon when one answers on its
socket, else offline on this device, so the store and the daemon never disagree.
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
def _open(state_dir: Path | None, cfg: DaemonConfig | None = None) -> Iterator[ModelStore]:
    from edgert.security.loader import open_audit, open_keystore, open_store

    root = resolve_root(state_dir)
    keys = open_keystore(root)
    publishers = cfg.trusted_publishers if cfg is not None else ()
    with open_audit(root, keys) as audit:
        yield open_store(root, keys, audit, extra_publishers=publishers)


def _deploy(store: ModelStore, name: str, version: str | None, *, reason: str, allow_downgrade: bool,
            socket_path: str | None, cfg: DaemonConfig | None) -> None:
    """Serve ``name`` at ``version`` through the Deployer; print what happened."""
    from edgert.config import DEFAULT_SOCKET_PATH
    from edgert.device.control import deploy_from_cli
    from edgert.security.store import DEFAULT_KEEP_VERSIONS

    sock = socket_path or (cfg.socket.path if cfg is not None else DEFAULT_SOCKET_PATH)
    audit = store.audit.append if store.audit is not None else None
    before = set(store.entry(name).installed)
    outcome = deploy_from_cli(store, name, version, allow_downgrade=allow_downgrade, reason=reason,
                              socket_path=sock or None, profile=cfg.profile if cfg is not None else "auto",
                              audit=audit)
    click.echo(outcome.message)
    # The Deployer prunes by the store's policy when a version becomes active (here or in the daemon).
    pruned = sorted(before - set(store.entry(name).installed))
    if pruned:
        click.echo(f"pruned {name} {', '.join(pruned)} (the store keeps {DEFAULT_KEEP_VERSIONS} versions: "
                   "active, previous, any pending newer ones, then the highest; see docs/security.md)")


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
    with _open(_root(state_dir, cfg), cfg) as store:
        _deploy(store, name, version, reason="activate", allow_downgrade=allow_downgrade,
                socket_path=socket_path, cfg=cfg)


@click.command("rollback")
@click.argument("name")
@state_dir_option
@daemon_options
def rollback_cmd(name: str, state_dir: Path | None, socket_path: str | None,
                 config_path: Path | None) -> None:
    """Swap NAME's active and previous versions, then hot-swap the running daemon."""
    cfg = _daemon_config(config_path)
    with _open(_root(state_dir, cfg), cfg) as store:
        _deploy(store, name, None, reason="rollback", allow_downgrade=True, socket_path=socket_path, cfg=cfg)


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
@click.option("--no-activate", is_flag=True, help="Install only; do not serve the new version.")
@state_dir_option
@daemon_options
def import_cmd(files: tuple[Path, ...], name: str | None, version: str, variant: str | None, is_package: bool,
               allow_downgrade: bool, shred: bool, no_activate: bool, state_dir: Path | None,
               socket_path: str | None, config_path: Path | None) -> None:
    """Encrypt plaintext model FILES to this device's key and store them (or install .edgepkg files).

    Each imported version is then served through the Deployer (the running daemon hot-swaps it, or,
    with no daemon, it is loaded and health-checked here before it becomes active).
    """
    from edgert.device.importing import import_plaintext
    from edgert.errors import ConfigError

    if name and len(files) > 1:
        raise ConfigError("--name works with one file only")
    cfg = _daemon_config(config_path)
    with _open(_root(state_dir, cfg), cfg) as store:
        for f in files:
            if is_package or f.suffix == ".edgepkg":
                m = store.install(f, activate=False, allow_downgrade=allow_downgrade)
            else:
                m = import_plaintext(store, f, name=name, version=version, variant=variant,
                                     shred_source=shred, allow_downgrade=allow_downgrade, activate=False)
            click.echo(f"imported {m.name} {m.version} ({', '.join(_variants(m))})")
            if not no_activate:
                _deploy(store, m.name, m.version, reason="import", allow_downgrade=allow_downgrade,
                        socket_path=socket_path, cfg=cfg)


def _variants(manifest: Any) -> list[str]:
    variants = getattr(manifest, "variants", None)
    if variants:
        return [f"{v.variant} {v.format}" for v in variants]
    return [f"{manifest.variant} {manifest.format}"]


@click.command("list")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@daemon_options
def list_cmd(state_dir: Path | None, as_json: bool, socket_path: str | None,
             config_path: Path | None) -> None:
    """List models in the store: versions, variants, failures, and which variant serves and why."""
    cfg = _daemon_config(config_path)
    with _open(_root(state_dir, cfg), cfg) as store:
        entries = store.entries()
    serving = _serving(entries, socket_path, cfg)
    if as_json:
        click.echo(json.dumps([{**e.__dict__, "serving": serving.get(e.name)} for e in entries], indent=2))
        return
    click.echo(f"{'NAME':20} {'ACTIVE':8} {'PREVIOUS':8} {'FLOOR':8} {'INSTALLED':16} SERVING")
    for e in entries:
        s = serving.get(e.name) or {}
        where = f"{s.get('variant', '-')} ({s.get('source')}: {s.get('reason')})" if s else "-"
        click.echo(f"{e.name:20} {e.active or '-':8} {e.previous or '-':8} {e.highest or '-':8} "
                   f"{','.join(e.installed) or '-':16} {where}")
        for version in e.installed:
            variants = ", ".join(e.variants.get(version, []))
            failed = f"  FAILED: {e.failed[version]}" if version in e.failed else ""
            click.echo(f"  {version}: {variants}{failed}")


def _serving(entries: list[Any], socket_path: str | None,
             cfg: DaemonConfig | None) -> dict[str, dict[str, str]]:
    """Which variant of each active version serves, and why: from the running daemon, else the profile."""
    from edgert.client import Client
    from edgert.config import DEFAULT_SOCKET_PATH
    from edgert.errors import EdgertError
    from edgert.profiles import variant_order

    sock = socket_path or (cfg.socket.path if cfg is not None else DEFAULT_SOCKET_PATH)
    out: dict[str, dict[str, str]] = {}
    try:
        with Client(f"unix://{sock}", timeout=5.0) as c:
            models = c.status().get("models", {})
        for name, m in models.items():
            if m.get("variant"):
                out[name] = {"version": m["version"], "variant": m["variant"], "reason": m["variant_reason"],
                             "source": "daemon"}
            elif m.get("state") in ("lazy", "failed"):  # not loaded: on its next request, or it failed
                out[name] = {"version": m.get("version") or "", "variant": m["state"], "source": "daemon",
                             "reason": m.get("error") or "loads on its next request"}
    except (EdgertError, OSError):
        pass
    missing = [e for e in entries if e.name not in out and e.active and e.variants.get(e.active)]
    if missing:
        from edgert.runtime import Runtime

        try:
            profile = Runtime(profile=cfg.profile if cfg is not None else "auto").profile
        except EdgertError:
            return out
        for e in missing:
            variant, why = variant_order(profile.variants, e.variants[e.active])[0]
            out[e.name] = {"version": e.active, "variant": variant, "reason": f"{why} ({profile.name})",
                           "source": "would serve"}
    return out
