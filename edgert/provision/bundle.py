"""The technician's site bundle: what a device needs to join a fleet, and a short-lived claim.

A bundle (JSON, 0600) carries the fleet id, two broker endpoints (``broker``: where devices connect
with their own certificate; ``claim_broker``: where a claim holder enrolls with the claim id and
secret), the broker CA, the TUF root, the publisher, command and capture *public* keys, the groups
it may enroll into, and one claim (id and secret). It never holds a private key: the device makes
its own.

The fleet signs the bundle with its publisher key (Ed25519 over :data:`SIG_CONTEXT` and the
canonical JSON of every field but ``sig``). The technician verifies it against the fleet key they
were given (``--fleet-key``), so a bundle changed on the way (another broker, another CA, another
TUF root) is refused. Expiry is checked with ``now`` passed in, so tests move the clock.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgert.errors import ConfigError, KeyFileError, ProvisionError, SignatureError
from edgert.security.atomic import FileSystem

__all__ = [
    "BUNDLE_VERSION",
    "SIG_CONTEXT",
    "Bundle",
    "Endpoint",
    "create_bundle",
    "load_bundle",
    "parse_endpoint",
    "parse_fleet_key",
    "verify_device_part",
    "write_bundle",
]

BUNDLE_VERSION = 2
MAX_BUNDLE_BYTES = 1 << 20
#: Domain separation: a bundle signature can never be taken for a package or document signature.
SIG_CONTEXT = b"edgert site bundle v2\n"
#: The part the device receives (no claim) carries its own signature, for devices with a pinned fleet key.
DEVICE_SIG_CONTEXT = b"edgert site bundle v2 device part\n"
_TS = "%Y-%m-%dT%H:%M:%SZ"
RECREATE_HINT = (
    "recreate it with 'edgert provision bundle create --fleet DIR --groups G "
    "--broker HOST:PORT --claim-broker HOST:PORT -o FILE' (docs/provisioning.md)"
)


@dataclass(frozen=True)
class Endpoint:
    """One broker listener: address, MQTT protocol, and whether it speaks TLS (with the bundle's CA)."""

    host: str
    port: int
    protocol: str = "5"
    tls: bool = False

    def to_json(self) -> dict[str, Any]:
        """The bundle's form."""
        return {"host": self.host, "port": self.port, "protocol": self.protocol, "tls": self.tls}

    @classmethod
    def from_json(cls, doc: Any) -> Endpoint:
        """Parse the bundle's form (KeyError/TypeError/ValueError on bad input)."""
        return cls(str(doc["host"]), int(doc["port"]), str(doc.get("protocol", "5")), bool(doc["tls"]))


def parse_endpoint(text: str, what: str = "--broker") -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port); ConfigError naming ``what`` otherwise."""
    host, sep, port = str(text).strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what} {text!r} is not HOST:PORT", hint=f"e.g. {what} mqtt.example.com:8883")
    return host.strip("[]"), int(port)


def parse_fleet_key(text: str) -> Ed25519PublicKey:
    """The fleet key a technician trusts: ``ed25519:<base64>``, a PEM public key, or a file holding one."""
    from edgert.security.trust import parse_publisher_key

    text = str(text).strip()
    if not text.startswith(("ed25519:", "-----BEGIN")):
        p = Path(text).expanduser()
        try:
            text = p.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigError(
                f"--fleet-key {text!r} is neither an 'ed25519:' key nor a readable file",
                hint="pass the fleet key the operator gave you ('edgert provision bundle create' prints it)",
            ) from None
    return parse_publisher_key(text)


def _signed_bytes(doc: dict[str, Any], context: bytes = SIG_CONTEXT) -> bytes:
    body = {k: v for k, v in doc.items() if k not in ("sig", "device_sig")}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return context + canon.encode("ascii")


def _refused(what: str, trusted: Ed25519PublicKey) -> SignatureError:
    from edgert.security.keys import format_public_key

    return SignatureError(
        f"{what} is not signed by the fleet key you trust ({format_public_key(trusted)}): "
        "it was changed after the fleet made it, or it belongs to another fleet",
        hint="get a fresh bundle from the fleet operator; check --fleet-key against theirs",
    )


def verify_device_part(doc: Any, trusted: Ed25519PublicKey) -> None:
    """SignatureError unless ``doc`` (what ``configure`` gets) is signed (``device_sig``) by ``trusted``."""
    from edgert.security.trust import parse_publisher_key, publisher_fingerprint

    try:
        trusted.verify(
            base64.b64decode(str(doc["device_sig"]), validate=True),
            _signed_bytes(dict(doc), DEVICE_SIG_CONTEXT),
        )
        if publisher_fingerprint(parse_publisher_key(str(doc["publisher"]))) != publisher_fingerprint(
            trusted
        ):
            raise InvalidSignature
    except (InvalidSignature, ValueError, TypeError, KeyError, SignatureError, KeyFileError):
        raise _refused("the bundle", trusted) from None


@dataclass(frozen=True)
class Bundle:
    """A parsed site bundle."""

    fleet: str
    broker: Endpoint
    claim_broker: Endpoint
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
    sig: str = ""
    device_sig: str = ""

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
        doc: dict[str, Any] = {
            "v": BUNDLE_VERSION,
            "fleet": self.fleet,
            "broker": self.broker.to_json(),
            "claim_broker": self.claim_broker.to_json(),
            "broker_ca_pem": self.broker_ca_pem,
            "tuf_root": base64.b64encode(self.tuf_root).decode(),
            "publisher": self.publisher,
            "command_pem": self.command_pem,
            "capture": self.capture,
            "groups": list(self.groups),
            "claim": {"id": self.claim_id, "secret": self.claim_secret},
            "expires": self.expires,
            "telemetry_interval": self.telemetry_interval,
        }
        if self.sig:
            doc["sig"] = self.sig
        if self.device_sig:
            doc["device_sig"] = self.device_sig
        return doc

    def signed(self, key: Ed25519PrivateKey) -> Bundle:
        """This bundle signed by the fleet's publisher key (the whole, and the part the device gets)."""
        b64 = base64.b64encode
        device_sig = b64(key.sign(_signed_bytes(self._device_doc(), DEVICE_SIG_CONTEXT))).decode()
        return replace(self, sig=b64(key.sign(_signed_bytes(self.to_json()))).decode(), device_sig=device_sig)

    def verify(self, trusted: Ed25519PublicKey, source: str = "bundle") -> None:
        """SignatureError unless ``trusted`` (the fleet key the technician holds) signed this bundle."""
        from edgert.security.trust import parse_publisher_key, publisher_fingerprint

        fp = publisher_fingerprint(trusted)
        try:
            trusted.verify(base64.b64decode(self.sig, validate=True), _signed_bytes(self.to_json()))
            if publisher_fingerprint(parse_publisher_key(self.publisher)) != fp:
                raise InvalidSignature
        except (InvalidSignature, ValueError, SignatureError, KeyFileError):
            raise _refused(source, trusted) from None

    @classmethod
    def from_json(cls, doc: Any, source: str) -> Bundle:
        """Validate a bundle document."""
        version = doc.get("v") if isinstance(doc, dict) else None
        if isinstance(version, int) and version < BUNDLE_VERSION:
            raise ConfigError(
                f"{source}: bundle format {version} is too old (no claim endpoint, no signature)",
                hint=RECREATE_HINT,
            )
        if version != BUNDLE_VERSION:
            raise ConfigError(
                f"{source}: bundle format {version!r}, this edgert reads {BUNDLE_VERSION}",
                hint="upgrade edgert, or make the bundle with the same edgert version",
            )
        try:
            return cls(
                str(doc["fleet"]),
                Endpoint.from_json(doc["broker"]),
                Endpoint.from_json(doc["claim_broker"]),
                doc.get("broker_ca_pem"),
                base64.b64decode(doc["tuf_root"], validate=True),
                str(doc["publisher"]),
                str(doc["command_pem"]),
                str(doc["capture"]),
                tuple(str(g) for g in doc["groups"]),
                str(doc["claim"]["id"]),
                str(doc["claim"]["secret"]),
                str(doc["expires"]),
                float(doc.get("telemetry_interval", 60.0)),
                str(doc.get("sig", "")),
                str(doc.get("device_sig", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"{source} is not a valid site bundle ({type(exc).__name__}: {exc})",
                hint="make a new one with 'edgert provision bundle create'",
            ) from None

    def _device_doc(self) -> dict[str, Any]:
        doc = self.to_json()
        for k in ("claim", "sig", "device_sig"):
            doc.pop(k, None)
        return doc

    def device_public(self) -> dict[str, Any]:
        """What the device's ``configure`` step receives: everything but the claim, with ``device_sig``."""
        return {**self._device_doc(), "device_sig": self.device_sig}


def create_bundle(
    fleet_path: str | Path,
    *,
    groups: list[str],
    lifetime: timedelta,
    uses: int,
    now: datetime | None = None,
    telemetry_interval: float = 60.0,
    broker: tuple[str, int] | None = None,
    claim_broker: tuple[str, int] | None = None,
    broker_ca: str | Path | None = None,
    claim_tls: bool | None = None,
) -> Bundle:
    """Make a claim in the fleet and a signed bundle around it.

    ``broker`` (devices, their own certificate) defaults to ``fleet.toml`` [broker]; ``claim_broker``
    (the claim listener) to the same address; ``broker_ca`` to [broker] ``ca_file``. Both endpoints
    speak TLS when there is a CA, unless ``claim_tls`` says otherwise for the claim listener.
    """
    from edgert.fleet.enrollment import create_claim
    from edgert.fleet.fleetdir import FleetDir
    from edgert.security.trust import load_publisher_key

    fleet = FleetDir.open(fleet_path)
    unknown = [g for g in groups if fleet.groups and g not in fleet.groups]
    if unknown:
        raise ConfigError(
            f"fleet {fleet.id} has no group {', '.join(unknown)}",
            hint=f"groups: {', '.join(sorted(fleet.groups))}",
        )
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    ca_path = broker_ca or fleet.broker.ca_file
    try:
        ca_pem = Path(ca_path).read_text(encoding="ascii") if ca_path else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"broker CA {ca_path} is unreadable: {exc}", hint="pass --broker-ca FILE") from None
    if ca_pem is not None and "BEGIN CERTIFICATE" not in ca_pem:
        raise ConfigError(f"broker CA {ca_path} is not a PEM certificate", hint="pass --broker-ca FILE")
    host, port = broker or (fleet.broker.host, fleet.broker.port)
    device_ep = Endpoint(host, port, fleet.broker.protocol, tls=ca_pem is not None)
    c_host, c_port = claim_broker or (host, port)
    tls = (ca_pem is not None) if claim_tls is None else claim_tls
    if tls and ca_pem is None:
        raise ConfigError(
            "the claim listener uses TLS but the bundle has no broker CA", hint="pass --broker-ca FILE"
        )
    claim_ep = Endpoint(c_host, c_port, fleet.broker.protocol, tls=tls)
    key = load_publisher_key(fleet.publisher_key_path)
    claim, secret = create_claim(fleet, groups=groups, lifetime=lifetime, uses=uses, now=now)
    return Bundle(
        fleet.id,
        device_ep,
        claim_ep,
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
    ).signed(key)


def write_bundle(bundle: Bundle, path: str | Path) -> None:
    """Write the bundle atomically, mode 0600 (it holds the claim secret)."""
    FileSystem().atomic_write(
        Path(path), [json.dumps(bundle.to_json(), indent=1).encode()], mode=0o600, step="bundle"
    )


def load_bundle(path: str | Path, *, trusted: Ed25519PublicKey | None, now: datetime | None = None) -> Bundle:
    """Read, verify against ``trusted`` (the fleet key) and check a bundle's expiry at ``now``.

    ``trusted=None`` skips the signature check; only the fleet side (which made the bundle) and
    tests of other properties pass it.
    """
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
    if trusted is not None:
        bundle.verify(trusted, f"bundle {p}")
    bundle.check_fresh((now or datetime.now(timezone.utc)).astimezone(timezone.utc))
    return bundle
