"""``init_fleet``: create a fleet directory with every key, the CA and version 1 of the TUF metadata."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from edgert.errors import ConfigError
from edgert.fleet.ca import create_ca
from edgert.fleet.fleetdir import (
    CAPTURE_PUB,
    COMMAND_PUB,
    DEFAULT_EXPIRES,
    ESCROW_PUB,
    FLEET_TOML,
    PUBLISHER_PUB,
    ROLES,
    FleetDir,
    format_duration,
)
from edgert.fleet.keyring import new_role_signer, save_role_key
from edgert.fleet.repository import PUBLIC_FILE_MODE, TufRepository, ensure_public_dir
from edgert.mqtt.topics import check_id
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.keys import fingerprint, format_public_key
from edgert.security.trust import generate_publisher_key

__all__ = ["FleetInit", "init_fleet"]

#: Most root keys one fleet may create at init.
MAX_ROOT_KEYS = 15


@dataclass(frozen=True)
class FleetInit:
    """What ``init_fleet`` made: the fleet, and public keys / fingerprints safe to print."""

    fleet: FleetDir
    public: dict[str, str] = field(default_factory=dict)
    root_key_files: tuple[Path, ...] = ()


def _pem(key: ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fleet_toml(fleet_id: str, broker_host: str, broker_port: int, expires: dict[str, timedelta]) -> str:
    """The initial ``fleet.toml`` text."""
    lines = [
        "# edgert fleet (see docs/fleet.md). [broker] takes the same keys as a device's [mqtt] broker part.",
        "[fleet]",
        f"id = {_toml_str(fleet_id)}",
        "",
        "[broker]",
        f"host = {_toml_str(broker_host)}",
        f"port = {broker_port}",
        "",
        "[groups]",
        "",
        "[repository.expires]",
    ]
    lines += [f"{role} = {_toml_str(format_duration(expires[role]))}" for role in ROLES]
    return "\n".join(lines) + "\n"


def init_fleet(
    path: str | Path,
    *,
    fleet_id: str | None = None,
    root_threshold: int = 1,
    root_keys: int = 1,
    expires: dict[str, timedelta] | None = None,
    broker_host: str = "127.0.0.1",
    broker_port: int = 1883,
    now: datetime | None = None,
) -> FleetInit:
    """Create a fleet directory (never over another): keys, CA, fleet.toml, TUF metadata v1."""
    root = Path(path)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(
            f"{root} exists and is not an empty directory",
            hint="choose a new directory; a fleet is never initialised over another",
        )
    fleet_id = check_id(fleet_id or root.resolve().name, "fleet id")
    if not 1 <= root_keys <= MAX_ROOT_KEYS or not 1 <= root_threshold <= root_keys:
        raise ConfigError(
            f"root threshold {root_threshold} of {root_keys} keys is not possible",
            hint=f"use 1 <= --root-threshold <= --root-keys <= {MAX_ROOT_KEYS}",
        )
    expires = dict(expires or DEFAULT_EXPIRES)
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    fs = FileSystem()
    root.mkdir(parents=True, exist_ok=True)
    fs.atomic_write(
        root / FLEET_TOML,
        [fleet_toml(fleet_id, broker_host, broker_port, expires).encode()],
        mode=0o644,
        step="fleet-toml",
    )
    fleet = FleetDir.open(root)
    keys = ensure_private_dir(fleet.keys_dir)
    os.chmod(keys, 0o700)
    ensure_private_dir(fleet.devices_dir)
    public = ensure_public_dir(fleet.public_dir)

    def write_public(name: str, data: bytes) -> None:
        fs.atomic_write(public / name, [data], mode=PUBLIC_FILE_MODE, step=f"public-{name}")

    root_signers = [new_role_signer() for _ in range(root_keys)]
    root_files = tuple(save_role_key(keys, "root", s, fs=fs) for s in root_signers)
    role_signers = {role: new_role_signer() for role in ROLES[1:]}
    for role, s in role_signers.items():
        save_role_key(keys, role, s, fs=fs)

    publisher = generate_publisher_key(fleet.publisher_key_path, fs=fs)
    write_public(PUBLISHER_PUB, (format_public_key(publisher) + "\n").encode())

    command = ed25519.Ed25519PrivateKey.generate()
    fs.atomic_write(fleet.command_key_path, [_pem(command)], mode=0o600, step="command-key")
    write_public(
        COMMAND_PUB,
        command.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )

    x_public: dict[str, str] = {}
    for name, key_path, pub_name in (
        ("capture", fleet.capture_key_path, CAPTURE_PUB),
        ("escrow", fleet.escrow_key_path, ESCROW_PUB),
    ):
        xkey = x25519.X25519PrivateKey.generate()
        fs.atomic_write(key_path, [_pem(xkey)], mode=0o600, step=f"{name}-key")
        x_public[name] = format_public_key(xkey.public_key())
        write_public(pub_name, (x_public[name] + "\n").encode())

    cert = create_ca(fleet.ca_key_path, fleet.ca_cert_path, fleet_id, now=now, fs=fs)
    write_public("ca.pem", cert.public_bytes(serialization.Encoding.PEM))

    TufRepository.create(
        fleet, root_signers=root_signers, root_threshold=root_threshold, role_signers=role_signers, now=now
    )
    summary = {
        "fleet": fleet_id,
        "publisher": format_public_key(publisher),
        "publisher_fingerprint": fingerprint(publisher),
        "command_public_key_file": str(fleet.command_public_key_path),
        "command_fingerprint": fingerprint(command.public_key()),
        "capture": x_public["capture"],
        "escrow": x_public["escrow"],
        "ca_certificate": str(public / "ca.pem"),
        "tuf_root": str(fleet.metadata_dir / "1.root.json"),
        "tuf_root_keys": ", ".join(s.public_key.keyid for s in root_signers),
        "tuf_root_threshold": f"{root_threshold} of {root_keys}",
    }
    for role, s in role_signers.items():
        summary[f"tuf_{role}_key"] = s.public_key.keyid
    return FleetInit(fleet, summary, root_files)
