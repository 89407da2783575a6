"""The technician's site bundle: what a device needs to join a fleet, and a short-lived claim.

A bundle (JSON, 0600) carries the fleet id, the broker address and CA, the TUF root, the
publisher, command and capture *public* keys, the groups it may enroll into, and one claim (id and
secret). It never holds a private key: the device makes its own. Expiry is checked with ``now``
passed in, so tests move the clock.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, ProvisionError
from edgert.security.atomic import FileSystem

__all__ = ["BUNDLE_VERSION", "Bundle", "create_bundle", "load_bundle", "write_bundle"]

BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 1 << 20
_TS = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True)
class Bundle:
    """A parsed site bundle."""

    fleet: str
    broker_host: str
    broker_port: int
    broker_protocol: str
    broker_ca_pem: str | None
    tuf_root: bytes
    publisher: str
    command_pem: str
    capture: str
    groups: tuple[str, ...]
    claim_id: str
    claim_secret: str
    expires: str
    telemetry_interval: float = 60.0

    @property
    def expires_at(self) -> datetime:
        """Expiry as an aware datetime."""
        return datetime.strptime(self.expires, _TS).replace(tzinfo=timezone.utc)

    def check_fresh(self, now: datetime) -> None:
        """ProvisionError naming the date if the bundle (its claim) has expired."""
        if now >= self.expires_at:
            raise ProvisionError(
                f"bundle expired on {self.expires}",
                hint="ask the fleet operator for a new one ('edgert provision bundle create')",
            )

    def to_json(self) -> dict[str, Any]:
        """The file's document."""
        return {
            "v": BUNDLE_VERSION,
            "fleet": self.fleet,
            "broker": {
                "host": self.broker_host,
                "port": self.broker_port,
                "protocol": self.broker_protocol,
                "ca_pem": self.broker_ca_pem,
            },
            "tuf_root": base64.b64encode(self.tuf_root).decode(),
            "publisher": self.publisher,
            "command_pem": self.command_pem,
            "capture": self.capture,
            "groups": list(self.groups),
            "claim": {"id": self.claim_id, "secret": self.claim_secret},
            "expires": self.expires,
            "telemetry_interval": self.telemetry_interval,
        }

    @classmethod
    def from_json(cls, doc: Any, source: str) -> Bundle:
        """Validate a bundle document."""
        try:
            if doc.get("v") != BUNDLE_VERSION:
                raise ConfigError(
                    f"{source}: bundle format {doc.get('v')!r}, this edgert reads {BUNDLE_VERSION}",
                    hint="make the bundle with the same edgert version",
                )
            b = doc["broker"]
            return cls(
                str(doc["fleet"]),
                str(b["host"]),
                int(b["port"]),
                str(b.get("protocol", "5")),
                b.get("ca_pem"),
                base64.b64decode(doc["tuf_root"], validate=True),
                str(doc["publisher"]),
                str(doc["command_pem"]),
                str(doc["capture"]),
                tuple(str(g) for g in doc["groups"]),
                str(doc["claim"]["id"]),
                str(doc["claim"]["secret"]),
                str(doc["expires"]),
                float(doc.get("telemetry_interval", 60.0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{source} is not a valid site bundle ({type(exc).__name__}: {exc})",
                hint="make a new one with 'edgert provision bundle create'",
            ) from None

    def device_public(self) -> dict[str, Any]:
        """What the device's ``configure`` step receives (everything but the claim)."""
        doc = self.to_json()
        doc.pop("claim")
        return doc


def create_bundle(
    fleet_path: str | Path,
    *,
    groups: list[str],
    lifetime: timedelta,
    uses: int,
    now: datetime | None = None,
    telemetry_interval: float = 60.0,
) -> Bundle:
    """Make a claim in the fleet and a bundle around it (reads only public fleet files and the root)."""
    from edgert.fleet.enrollment import create_claim
    from edgert.fleet.fleetdir import FleetDir

    fleet = FleetDir.open(fleet_path)
    unknown = [g for g in groups if fleet.groups and g not in fleet.groups]
    if unknown:
        raise ConfigError(
            f"fleet {fleet.id} has no group {', '.join(unknown)}",
            hint=f"groups: {', '.join(sorted(fleet.groups))}",
        )
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    ca_pem = Path(fleet.broker.ca_file).read_text(encoding="ascii") if fleet.broker.ca_file else None
    claim, secret = create_claim(fleet, groups=groups, lifetime=lifetime, uses=uses, now=now)
    return Bundle(
        fleet.id,
        fleet.broker.host,
        fleet.broker.port,
        fleet.broker.protocol,
        ca_pem,
        fleet.root_bytes(),
        fleet.publisher_public,
        fleet.command_public_key_path.read_text(encoding="ascii"),
        fleet.capture_public,
        tuple(groups),
        claim.id,
        secret,
        claim.expires,
        telemetry_interval,
    )


def write_bundle(bundle: Bundle, path: str | Path) -> None:
    """Write the bundle atomically, mode 0600 (it holds the claim secret)."""
    FileSystem().atomic_write(
        Path(path), [json.dumps(bundle.to_json(), indent=1).encode()], mode=0o600, step="bundle"
    )


def load_bundle(path: str | Path, *, now: datetime | None = None) -> Bundle:
    """Read and validate a bundle; ProvisionError if it has expired at ``now`` (default: the clock)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"bundle {p} does not exist",
            hint="make one with 'edgert provision bundle create --fleet DIR -o FILE'",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read bundle {p}: {exc.strerror}") from None
    if len(raw) > MAX_BUNDLE_BYTES:
        raise ConfigError(f"{p} is too large to be a site bundle")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{p} is not a site bundle (not JSON)") from None
    bundle = Bundle.from_json(doc, str(p))
    bundle.check_fresh((now or datetime.now(timezone.utc)).astimezone(timezone.utc))
    return bundle
