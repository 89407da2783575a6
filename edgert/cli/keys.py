"""``edgert keys init|show|trust|untrust``: the device's own key pairs and the publishers it trusts."""

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
    """Device keys (X25519 wrap, Ed25519 audit/local signing, P-256 TLS) and trusted package publishers."""


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
    """Print public keys, fingerprints and trusted publishers (never private keys)."""
    from edgert.security.keys import load_keystore
    from edgert.security.trust import TrustedPublishers

    root = resolve_root(state_dir)
    k = load_keystore(paths.keys_dir(root))
    summary: dict[str, Any] = dict(k.public_summary())
    if csr_cn:
        summary["tls_csr_pem"] = k.tls_csr(csr_cn).decode("ascii")
    publishers = TrustedPublishers.load(root).describe()
    if as_json:
        click.echo(json.dumps({**summary, "trusted_publishers": publishers}, indent=2))
        return
    for field in ("wrap_public_key", "wrap_fingerprint", "sign_public_key", "sign_fingerprint",
                  "tls_fingerprint"):
        click.echo(f"{field}: {summary[field]}")
    click.echo(summary["tls_public_key_pem"].rstrip())
    if csr_cn:
        click.echo(summary["tls_csr_pem"].rstrip())
    hint = "" if publishers else " (add one with 'edgert keys trust ed25519:...')"
    click.echo(f"trusted publishers: {len(publishers)}{hint}")
    for pub in publishers:
        click.echo(f"  {pub['fingerprint']} {pub['public_key']} ({pub['source']})")


def _publisher_key_text(value: str) -> str:
    """KEY given as ``ed25519:...``, PEM text, or a file holding either."""
    path = Path(value)
    if not value.startswith("ed25519:") and path.is_file():
        try:
            return path.read_text()
        except OSError as exc:
            from edgert.errors import KeyFileError

            raise KeyFileError(f"cannot read publisher key file {path}: {exc.strerror}") from exc
    return value


@keys.command("trust")
@click.argument("key", metavar="ed25519:...|FILE")
@state_dir_option
def trust_cmd(key: str, state_dir: Path | None) -> None:
    """Trust packages signed by this publisher key (pinned in <state>/trust/publishers; audited)."""
    from edgert.security.keys import load_keystore
    from edgert.security.loader import open_audit
    from edgert.security.trust import parse_publisher_key, trust_dir, trust_publisher

    root = resolve_root(state_dir)
    public = parse_publisher_key(_publisher_key_text(key))
    k = load_keystore(paths.keys_dir(root)) if paths.keys_dir(root).exists() else None
    with open_audit(root, k) as audit:
        fp, added = trust_publisher(root, public, audit=audit)
    if added:
        click.echo(f"trusting publisher {fp} (pinned in {trust_dir(root)})")
    else:
        click.echo(f"publisher {fp} was already trusted")


@keys.command("untrust")
@click.argument("fingerprint")
@state_dir_option
def untrust_cmd(fingerprint: str, state_dir: Path | None) -> None:
    """Stop trusting a publisher (packages already installed stay installed; audited)."""
    from edgert.errors import KeyFileError
    from edgert.security.keys import load_keystore
    from edgert.security.loader import open_audit
    from edgert.security.trust import untrust_publisher

    root = resolve_root(state_dir)
    k = load_keystore(paths.keys_dir(root)) if paths.keys_dir(root).exists() else None
    with open_audit(root, k) as audit:
        removed = untrust_publisher(root, fingerprint, audit=audit)
    if not removed:
        raise KeyFileError(f"publisher {fingerprint} is not pinned on this device",
                           hint="'edgert keys show' lists trusted publishers (keys from the daemon config "
                                "are removed there)")
    click.echo(f"no longer trusting publisher {fingerprint}")
