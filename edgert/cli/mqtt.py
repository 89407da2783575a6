"""``edgert mqtt``: check the broker connection, and sign fleet commands (fleet/test side)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from edgert.errors import ConfigError, SyncError


@click.group()
def mqtt() -> None:
    """MQTT sync: connection checks and fleet command signing."""


@mqtt.command("test")
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="edgert config file with an [mqtt] section.",
)
@click.option("--timeout", default=10.0, show_default=True, help="Seconds to wait for each step.")
def test_cmd(config_path: str, timeout: float) -> None:
    """Connect to the broker; check TLS, credentials, publish, subscribe and the ACL."""
    from edgert.device.sync_config import load_mqtt_settings
    from edgert.mqtt.probe import probe

    cfg = load_mqtt_settings(config_path)
    checks = probe(cfg.broker, cfg.sync.fleet, cfg.sync.device_id, timeout)
    failed = False
    for check in checks:
        mark = {True: "ok  ", False: "FAIL", None: "??  "}[check.ok]
        click.echo(f"{mark} {check.name:<10} {check.detail}")
        failed = failed or check.ok is False
    if failed:
        raise SyncError("some MQTT checks failed", hint="see the FAIL lines above")


@mqtt.command("gen-command-key")
@click.argument("private_key", type=click.Path(dir_okay=False))
def gen_command_key(private_key: str) -> None:
    """Create an Ed25519 fleet command key (PRIVATE_KEY, mode 0600) and PRIVATE_KEY.pub."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(private_key)
    if path.exists():
        raise ConfigError(f"{path} already exists", hint="choose a new file name; keys are never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    click.echo(f"wrote {path} (keep it secret) and {pub} (pin it as [mqtt] command_key_file)")


@mqtt.command("sign-command")
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Fleet private key.")
@click.option("--fleet", required=True)
@click.option("--device", required=True)
@click.option("--cmd", "command", required=True, help="Command name, e.g. ping.")
@click.option("--args", "args_json", default="{}", show_default=True, help="Command arguments as JSON.")
@click.option("--ttl", default=60.0, show_default=True, help="Seconds the command stays valid.")
@click.option("--request-id", default=None, help="Correlation id for MQTT 3.1.1 replies.")
def sign_cmd(
    key_path: str, fleet: str, device: str, command: str, args_json: str, ttl: float, request_id: str | None
) -> None:
    """Print a signed command payload (publish it to the device's cmd topic)."""
    from edgert.mqtt.signing import load_private_key, sign_command
    from edgert.mqtt.topics import check_id

    try:
        args = json.loads(args_json)
        check_id(fleet, "fleet id")
        check_id(device, "device id")
    except ValueError as exc:
        raise ConfigError(f"--args is not valid JSON: {exc}") from None
    if not isinstance(args, dict):
        raise ConfigError("--args must be a JSON object")
    key = load_private_key(key_path)
    payload = sign_command(
        key,
        cmd=command,
        fleet=fleet,
        device=device,
        now=time.time(),
        args=args,
        ttl=ttl,
        request_id=request_id,
    )
    click.echo(payload.decode())
