"""``edgert audit verify|head|tail``: check the chain, checkpoints and signed head; show head and events."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import click

from edgert import paths
from edgert.cli.keys import resolve_root, state_dir_option
from edgert.errors import ConfigError, IntegrityError, StoreError


@click.group()
def audit() -> None:
    """Verify and read the device audit log."""


@audit.command("verify")
@state_dir_option
@click.option("--public-key", default=None, metavar="ed25519:...",
              help="Checkpoint key (default: the device's own, from the keystore).")
@click.option("--fleet-head", "fleet_head", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="A head record the fleet kept (JSON from status or telemetry): the log must reach it.")
def verify_cmd(state_dir: Path | None, public_key: str | None, fleet_head: Path | None) -> None:
    """Check every record, checkpoint and the signed head; report the first bad record's index."""
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
    report = verify_dir(paths.audit_dir(root), pub, fleet_head=_read_fleet_head(fleet_head))
    if not report.ok:
        where = f"broken at record {report.first_bad}" if report.first_bad is not None else "not verified"
        intact = (f"records {report.first_index}..{report.first_bad - 1} verified; "
                  if report.first_bad is not None and report.first_bad > report.first_index else "")
        raise IntegrityError(f"audit log is {where}: {report.reason}",
                             hint=f"{intact}keep a copy of the log and its head file for analysis, and "
                                  "compare them with the fleet's copy of the head (--fleet-head)")
    span = f"records {report.first_index}..{report.last_index}"
    pruned = f"; records 0..{report.first_index - 1} pruned by retention" if report.first_index else ""
    anchor = (f"; it reaches its signed head (record {report.head_seq})" if report.head_seq is not None else
              "; no head file (a cut-back log cannot be detected; any audited command creates one)")
    click.echo(f"audit log ok: {report.records} records ({span}), {report.checkpoints} signed checkpoints, "
               f"{report.unsigned_tail} records after the last checkpoint{pruned}{anchor}")


def _read_fleet_head(path: Path | None) -> dict[str, Any] | None:
    """The head record in ``path`` (JSON; a status document with an ``audit.head`` member also works)."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the fleet's head record {path}: {exc}",
                          hint="give the JSON head record from the device's status or telemetry "
                               "({\"v\": 1, \"seq\": ..., \"hash\": ..., \"sig\": ...})") from exc
    if isinstance(doc, dict) and isinstance(doc.get("audit"), dict):
        doc = doc["audit"].get("head")
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} holds no head record",
                          hint="expected {\"v\": 1, \"seq\", \"hash\", \"sig\"}")
    return doc


@audit.command("head")
@state_dir_option
def head_cmd(state_dir: Path | None) -> None:
    """Print the log's signed head (JSON), the record the fleet should keep a copy of."""
    from edgert.security.audit_chain import read_head

    directory = paths.audit_dir(resolve_root(state_dir))
    try:
        head = read_head(directory)
    except ValueError as exc:
        raise IntegrityError(f"the audit head file cannot be read: {exc}",
                             hint="run 'edgert audit verify' and keep a copy of the log") from exc
    if head is None:
        raise StoreError(f"no audit head file in {directory}",
                         hint="it is written at the first signed checkpoint; any audited command creates it")
    click.echo(json.dumps(head, sort_keys=True))


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
