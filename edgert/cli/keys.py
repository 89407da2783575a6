"""``edgert keys init|show``: the device's own key pairs (private keys never leave the device)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgert import paths

F = Callable[..., Any]


def state_dir_option(func: F) -> F:
    """The ``--state-dir`` option every security command takes."""
    return click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="State directory (default: $EDGERT_STATE_DIR or /var/lib/edgert).")(func)


def resolve_root(state_dir: Path | None) -> Path:
    """The effective state directory."""
    return paths.state_dir(state_dir)


@click.group()
def keys() -> None:
    """Create and show the device's keys (X25519 wrap, Ed25519 audit, P-256 TLS)."""


@keys.command("init")
@state_dir_option
def init_cmd(state_dir: Path | None) -> None:
    """Create the device keys (0600 files in a 0700 directory); refuses to overwrite."""
    from edgert.security.keys import init_keystore
    from edgert.security.loader import open_audit

    root = resolve_root(state_dir)
    k = init_keystore(paths.keys_dir(root))
    with open_audit(root, k) as audit:
        audit.append("keys_created", fingerprint=k.wrap_fingerprint)
    click.echo(f"created device keys in {paths.keys_dir(root)}")
    click.echo(f"x25519 (package recipient): {k.public_summary()['wrap_public_key']}")
    click.echo(f"fingerprint: {k.wrap_fingerprint}")


@keys.command("show")
@state_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--csr", "csr_cn", default=None, metavar="CN", help="Also print a TLS client CSR with this CN.")
def show_cmd(state_dir: Path | None, as_json: bool, csr_cn: str | None) -> None:
    """Print public keys and fingerprints (never private keys)."""
    from edgert.security.keys import load_keystore

    k = load_keystore(paths.keys_dir(resolve_root(state_dir)))
    summary = k.public_summary()
    if csr_cn:
        summary["tls_csr_pem"] = k.tls_csr(csr_cn).decode("ascii")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for field in ("wrap_public_key", "wrap_fingerprint", "sign_public_key", "sign_fingerprint",
                  "tls_fingerprint"):
        click.echo(f"{field}: {summary[field]}")
    click.echo(summary["tls_public_key_pem"].rstrip())
    if csr_cn:
        click.echo(summary["tls_csr_pem"].rstrip())
