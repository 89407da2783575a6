"""The fleet directory: ``fleet.toml``, keys, the TUF repository, registered devices (see docs/fleet.md).

Layout (FLEET is the directory given to ``edgert fleet init``)::

    FLEET/fleet.toml                  [fleet] id, [broker] (the device [mqtt] broker keys), [groups],
                                      [repository] expiries
    FLEET/keys/ (0700)                TUF role keys <role>-<keyid16>.pem, publisher.pem, command.pem,
                                      capture.pem, escrow.pem, ca.key.pem, ca.pem (all 0600)
    FLEET/public/                     public halves to hand out: command.pub.pem, publisher.pub,
                                      capture.pub, escrow.pub, ca.pem
    FLEET/repository/metadata/        N.root.json, N.targets.json, N.snapshot.json, timestamp.json
    FLEET/repository/targets/         models/<name>/<sha256>.<version>.edgepkg (consistent snapshots)
    FLEET/devices/<device>.json       {"device", "groups", "x25519", "enrolled"}

:class:`FleetDir` only reads (parsing ``fleet.toml`` once into frozen values); writers live in
:mod:`edgert.fleet.repo_init`, :mod:`edgert.fleet.repository` and :func:`add_device`.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, KeyFileError
from edgert.mqtt.config import BrokerConfig, parse_broker
from edgert.mqtt.topics import check_id
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.keys import format_public_key, parse_public_key
from edgert.tomlschema import Problems

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 images
    import tomli as tomllib

__all__ = [
    "DEFAULT_EXPIRES",
    "ROLES",
    "DeviceRecord",
    "FleetDir",
    "add_device",
    "parse_duration",
    "parse_expires",
]

FLEET_TOML = "fleet.toml"
KEYS_DIR = "keys"
PUBLIC_DIR = "public"
REPOSITORY_DIR = "repository"
DEVICES_DIR = "devices"
ROLES = ("root", "targets", "snapshot", "timestamp")
#: How long each role's metadata stays valid when nothing else is said.
DEFAULT_EXPIRES: dict[str, timedelta] = {
    "root": timedelta(days=365),
    "targets": timedelta(days=90),
    "snapshot": timedelta(days=7),
    "timestamp": timedelta(days=1),
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION_RE = re.compile(r"^(\d{1,7})([smhdw])$")
FLEET_HINT = "see docs/fleet.md, section Repository"

# Key file names inside keys/ (TUF role keys are <role>-<keyid[:16]>.pem).
PUBLISHER_KEY = "publisher.pem"
COMMAND_KEY = "command.pem"
CAPTURE_KEY = "capture.pem"
ESCROW_KEY = "escrow.pem"
CA_KEY = "ca.key.pem"
CA_CERT = "ca.pem"
# Public files inside public/.
COMMAND_PUB = "command.pub.pem"
PUBLISHER_PUB = "publisher.pub"
CAPTURE_PUB = "capture.pub"
ESCROW_PUB = "escrow.pub"


def parse_duration(text: str, what: str = "duration") -> timedelta:
    """``"90d"``, ``"12h"``, ``"30m"``, ``"45s"``, ``"2w"`` -> timedelta (positive)."""
    m = _DURATION_RE.match(str(text).strip())
    if not m or int(m.group(1)) == 0:
        raise ConfigError(
            f"invalid {what} {text!r}", hint="use a positive number and a unit: 45s, 30m, 12h, 7d, 2w"
        )
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def parse_expires(text: str | None, base: dict[str, timedelta] | None = None) -> dict[str, timedelta]:
    """``"root=365d,timestamp=1d"`` -> per-role expiry periods (roles not named keep ``base``)."""
    out = dict(base or DEFAULT_EXPIRES)
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        role, sep, value = part.partition("=")
        if not sep or role.strip() not in ROLES:
            raise ConfigError(
                f"invalid expiry {part!r}", hint=f"use ROLE=DURATION with ROLE one of {', '.join(ROLES)}"
            )
        out[role.strip()] = parse_duration(value, f"{role.strip()} expiry")
    return out


def format_duration(period: timedelta) -> str:
    """A timedelta in the largest unit that divides it (the inverse of :func:`parse_duration`)."""
    seconds = int(period.total_seconds())
    for unit in ("w", "d", "h", "m"):
        if seconds % _UNITS[unit] == 0:
            return f"{seconds // _UNITS[unit]}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class DeviceRecord:
    """A device registered with the fleet: its groups and the X25519 key packages are wrapped to."""

    device: str
    groups: tuple[str, ...]
    x25519: str
    enrolled: str

    def to_json(self) -> dict[str, Any]:
        """The ``devices/<device>.json`` document."""
        return {
            "device": self.device,
            "groups": list(self.groups),
            "x25519": self.x25519,
            "enrolled": self.enrolled,
        }

    @classmethod
    def from_json(cls, doc: Any, source: str) -> DeviceRecord:
        """Validate a ``devices/<device>.json`` document."""
        try:
            record = cls(
                check_id(doc["device"], "device id"),
                tuple(check_id(g, "group") for g in doc["groups"]),
                str(doc["x25519"]),
                str(doc["enrolled"]),
            )
            parse_public_key(record.x25519)
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"device record {source} is malformed ({type(exc).__name__}: {exc})",
                hint="re-add the device with 'edgert fleet devices add'",
            ) from None
        except (KeyFileError, Exception) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(
                f"device record {source} is invalid: {getattr(exc, 'message', exc)}",
                hint="re-add the device with 'edgert fleet devices add'",
            ) from None
        return record


@dataclass(frozen=True)
class FleetDir:
    """A fleet directory, with ``fleet.toml`` parsed once (no other file is read on construction)."""

    path: Path
    id: str
    broker: BrokerConfig
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    expires: dict[str, timedelta] = field(default_factory=lambda: dict(DEFAULT_EXPIRES))

    @classmethod
    def open(cls, path: str | Path) -> FleetDir:
        """Read and validate ``FLEET/fleet.toml``; ConfigError naming the key if anything is wrong."""
        root = Path(path)
        toml_path = root / FLEET_TOML
        try:
            raw = tomllib.loads(toml_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{root} is not a fleet directory (no {FLEET_TOML})",
                hint="create one with 'edgert fleet init DIR', or pass --fleet DIR",
            ) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {toml_path}: {exc}", hint=FLEET_HINT) from None
        return cls.from_dict(root, raw, str(toml_path))

    @classmethod
    def from_dict(cls, root: Path, raw: dict[str, Any], source: str = FLEET_TOML) -> FleetDir:
        """Validate the parsed TOML of a fleet (no I/O)."""
        problems = Problems(source, hint=FLEET_HINT)
        top = problems.table(raw)
        fleet = top.table("fleet")
        fleet_id = fleet.string("id", required=True, nonempty=True)
        try:
            check_id(fleet_id, "fleet id")
        except Exception as exc:  # SyncError: reported as a config problem of this file
            fleet.fail("id", getattr(exc, "message", str(exc)))
        fleet.check_unknown()
        broker_table = top.table("broker")
        broker = parse_broker(broker_table, default_client_id=f"edgert-fleet-{fleet_id}")
        broker_table.check_unknown()
        groups_raw: dict[str, Any] = top.value("groups", dict, {})
        repo = top.table("repository")
        expires_table = repo.table("expires")
        expires = dict(DEFAULT_EXPIRES)
        for role in ROLES:
            if expires_table.has(role):
                try:
                    expires[role] = parse_duration(expires_table.string(role), f"{role} expiry")
                except ConfigError as exc:
                    expires_table.fail(role, exc.message)
        expires_table.check_unknown()
        repo.check_unknown()
        top.check_unknown()
        problems.raise_if_any()
        return cls(
            Path(root),
            fleet_id,
            broker,
            {str(k): dict(v) if isinstance(v, dict) else {"description": v} for k, v in groups_raw.items()},
            expires,
        )

    # -- paths ------------------------------------------------------------------------------------
    @property
    def keys_dir(self) -> Path:
        """``FLEET/keys`` (0700; private keys)."""
        return self.path / KEYS_DIR

    @property
    def public_dir(self) -> Path:
        """``FLEET/public`` (public halves, safe to hand out)."""
        return self.path / PUBLIC_DIR

    @property
    def repository_dir(self) -> Path:
        """``FLEET/repository``: serve this directory as is (HTTP, CDN, bucket) or through the controller."""
        return self.path / REPOSITORY_DIR

    @property
    def metadata_dir(self) -> Path:
        """``FLEET/repository/metadata``."""
        return self.repository_dir / "metadata"

    @property
    def targets_dir(self) -> Path:
        """``FLEET/repository/targets``."""
        return self.repository_dir / "targets"

    @property
    def devices_dir(self) -> Path:
        """``FLEET/devices``."""
        return self.path / DEVICES_DIR

    @property
    def db_path(self) -> Path:
        """``FLEET/fleet.sqlite`` (fleet state; owned by the rollout side)."""
        return self.path / "fleet.sqlite"

    @property
    def publisher_key_path(self) -> Path:
        """The package publisher's Ed25519 private key."""
        return self.keys_dir / PUBLISHER_KEY

    @property
    def command_key_path(self) -> Path:
        """The fleet command-signing Ed25519 private key (PEM; ``mqtt sign-command --key``)."""
        return self.keys_dir / COMMAND_KEY

    @property
    def command_public_key_path(self) -> Path:
        """The command public key (PEM SubjectPublicKeyInfo): a device pins it as ``command_key_file``."""
        return self.public_dir / COMMAND_PUB

    @property
    def capture_key_path(self) -> Path:
        """The fleet capture X25519 private key (opens sealed captures)."""
        return self.keys_dir / CAPTURE_KEY

    @property
    def escrow_key_path(self) -> Path:
        """The escrow X25519 private key (a recipient of every package; wraps keys for later devices)."""
        return self.keys_dir / ESCROW_KEY

    @property
    def ca_key_path(self) -> Path:
        """The fleet CA's EC P-256 private key."""
        return self.keys_dir / CA_KEY

    @property
    def ca_cert_path(self) -> Path:
        """The fleet CA certificate (PEM)."""
        return self.keys_dir / CA_CERT

    # -- public keys ------------------------------------------------------------------------------
    def _public_text(self, name: str) -> str:
        try:
            return (self.public_dir / name).read_text(encoding="ascii").strip()
        except OSError as exc:
            raise KeyFileError(
                f"fleet public key {self.public_dir / name} is unreadable: {exc.strerror}",
                hint="the fleet directory is incomplete; restore it from backup",
            ) from None

    @property
    def publisher_public(self) -> str:
        """The publisher key as ``ed25519:<base64>`` (what devices pin as a trusted publisher)."""
        return self._public_text(PUBLISHER_PUB)

    @property
    def capture_public(self) -> str:
        """The fleet capture key as ``x25519:<base64>`` (``edgert capture enable --fleet-key``)."""
        return self._public_text(CAPTURE_PUB)

    @property
    def escrow_public(self) -> str:
        """The escrow key as ``x25519:<base64>``."""
        return self._public_text(ESCROW_PUB)

    def root_bytes(self, version: int | None = None) -> bytes:
        """Root metadata bytes (the newest, or ``version``): what a device bootstraps its TUF trust from."""
        from edgert.fleet.repository import TufRepository

        return TufRepository(self).root_bytes(version)

    # -- devices ----------------------------------------------------------------------------------
    def devices(self) -> list[DeviceRecord]:
        """Registered devices, sorted by id."""
        if not self.devices_dir.is_dir():
            return []
        out = []
        for p in sorted(self.devices_dir.glob("*.json")):
            try:
                doc = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"device record {p} is unreadable: {exc}",
                    hint="re-add the device with 'edgert fleet devices add'",
                ) from None
            out.append(DeviceRecord.from_json(doc, str(p)))
        return out

    def device(self, device_id: str) -> DeviceRecord:
        """One registered device; ConfigError if it is not registered."""
        p = self.devices_dir / f"{check_id(device_id, 'device id')}.json"
        if not p.is_file():
            raise ConfigError(
                f"device {device_id} is not registered with fleet {self.id}",
                hint="register it with 'edgert fleet devices add DEVICE --groups G --x25519 ...'",
            )
        try:
            return DeviceRecord.from_json(json.loads(p.read_text(encoding="utf-8")), str(p))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"device record {p} is unreadable: {exc}") from None

    def devices_in(self, groups: Iterable[str]) -> list[DeviceRecord]:
        """Devices that belong to any of ``groups``."""
        wanted = set(groups)
        return [d for d in self.devices() if wanted & set(d.groups)]


def add_device(
    fleet: FleetDir,
    device_id: str,
    *,
    groups: list[str] | tuple[str, ...],
    x25519: str,
    now: datetime | None = None,
    replace: bool = False,
) -> DeviceRecord:
    """Register (or with ``replace``, update) a device: its groups and its X25519 public key."""
    check_id(device_id, "device id")
    if not groups:
        raise ConfigError("a device needs at least one group", hint="pass --groups G[,G...]")
    public = parse_public_key(x25519)
    path = fleet.devices_dir / f"{device_id}.json"
    if path.exists() and not replace:
        raise ConfigError(f"device {device_id} is already registered", hint="pass --replace to change it")
    record = DeviceRecord(
        device_id,
        tuple(check_id(g, "group") for g in groups),
        format_public_key(public),
        (now or datetime.now(timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    ensure_private_dir(fleet.devices_dir)
    FileSystem().atomic_write(
        path, [json.dumps(record.to_json(), indent=2).encode() + b"\n"], mode=0o600, step="device"
    )
    return record
