"""``edgert audit verify|tail``: check the hash chain and signed checkpoints, show recent events."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import click

from edgert import paths
from edgert.cli.keys import resolve_root, state_dir_option
from edgert.errors import IntegrityError


@click.group()
def audit() -> None:
    """Verify and read the device audit log."""


@audit.command("verify")
@state_dir_option
@click.option("--public-key", default=None, metavar="ed25519:...",
              help="Checkpoint key (default: the device's own, from the keystore).")
def verify_cmd(state_dir: Path | None, public_key: str | None) -> None:
    """Check every record and checkpoint; report the first bad record's index."""
    import base64

    from cryptography.hazmat.primitives.asymmetric import ed25519

    from edgert.security.audit import verify_dir
    from edgert.security.keys import ED25519_PREFIX, load_keystore

    root = resolve_root(state_dir)
    if public_key:
        raw = base64.b64decode(public_key.removeprefix(ED25519_PREFIX))
        pub = ed25519.Ed25519PublicKey.from_public_bytes(raw)
    else:
        pub = load_keystore(paths.keys_dir(root)).sign_public
    report = verify_dir(paths.audit_dir(root), pub)
    if not report.ok:
        raise IntegrityError(f"audit log is broken at record {report.first_bad}: {report.reason}",
                             hint="records before that index are intact; keep a copy of the log for analysis")
    click.echo(f"audit log ok: {report.records} records, {report.checkpoints} signed checkpoints, "
               f"{report.unsigned_tail} records after the last checkpoint")


@audit.command("tail")
@state_dir_option
@click.option("-n", "count", default=20, show_default=True, help="Number of records.")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON lines.")
def tail_cmd(state_dir: Path | None, count: int, as_json: bool) -> None:
    """Print the last records (unverified; run 'verify' to check them)."""
    from edgert.security.audit import read_records

    for record in deque(read_records(paths.audit_dir(resolve_root(state_dir))), maxlen=count):
        if as_json:
            click.echo(json.dumps(record, sort_keys=True))
        elif record.get("event") != "checkpoint":
            fields = " ".join(f"{k}={v}" for k, v in (record.get("data") or {}).items())
            click.echo(f"{record['i']:>6} {record['ts']} {record['event']} {fields}")
        else:
            click.echo(f"{record['i']:>6} {record['ts']} checkpoint (signed)")
