"""Enrollment by claim, fleet side: claims (create, verify, revoke, use count) and the MQTT handler.

A *claim* is a short-lived shared credential that a technician's bundle carries. Holding it lets a
device do exactly one thing: publish its CSR on ``edgert/v1/{fleet}/enroll/{claim}/request`` and
read ``.../enroll/{claim}/reply`` (the broker ACL grants nothing else to the claim's user). The
controller checks the claim (:func:`check_claim`: pure, ``now`` passed in), signs the CSR with the
fleet CA, registers the device's X25519 key so packages are wrapped to it, counts the use, and
answers with the certificate. The device then connects with its own certificate only.

Claims live in ``FLEET/claims/<id>.json`` (0600, written atomically; only the secret's SHA-256 is
stored). Attach :class:`EnrollmentHandler` to the controller like the repository responder.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, EdgertError, SecurityError
from edgert.fleet.ca import sign_device_csr
from edgert.fleet.fleetdir import FleetDir, add_device
from edgert.mqtt.topics import PREFIX, check_id
from edgert.security.atomic import FileSystem, ensure_private_dir

__all__ = [
    "CLAIMS_DIR",
    "MAX_REQUEST_BYTES",
    "Claim",
    "ClaimError",
    "EnrollmentHandler",
    "check_claim",
    "claim_acl",
    "create_claim",
    "enroll_reply_topic",
    "enroll_request_topic",
    "list_claims",
    "load_claim",
    "revoke_claim",
    "use_claim",
]

log = logging.getLogger("edgert.fleet.enrollment")

CLAIMS_DIR = "claims"
CLAIM_PREFIX = "claim-"
#: A CSR plus a few ids fits easily; anything larger is refused unread.
MAX_REQUEST_BYTES = 16 * 1024
#: Longest a claim may live: claims are for an install trip, not for a device's life.
MAX_CLAIM_LIFETIME = timedelta(days=90)
_TS = "%Y-%m-%dT%H:%M:%SZ"


class ClaimError(SecurityError):
    """A claim is unknown, expired, revoked, used up, or does not allow what was asked."""


@dataclass(frozen=True)
class Claim:
    """One enrollment claim as stored by the fleet (the secret itself is never stored)."""

    id: str
    fleet: str
    secret_sha256: str
    groups: tuple[str, ...]
    expires: str
    max_uses: int
    uses: int = 0
    revoked: bool = False
    created: str = ""
    devices: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The stored document."""
        doc = asdict(self)
        doc["groups"], doc["devices"] = list(self.groups), list(self.devices)
        return doc

    @classmethod
    def from_json(cls, doc: Any, source: str) -> Claim:
        """Validate a stored claim document."""
        try:
            return cls(
                str(doc["id"]),
                str(doc["fleet"]),
                str(doc["secret_sha256"]),
                tuple(str(g) for g in doc["groups"]),
                str(doc["expires"]),
                int(doc["max_uses"]),
                int(doc.get("uses", 0)),
                bool(doc.get("revoked", False)),
                str(doc.get("created", "")),
                tuple(str(d) for d in doc.get("devices", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"claim record {source} is malformed ({type(exc).__name__})",
                hint="revoke it and create a new claim",
            ) from None

    @property
    def expires_at(self) -> datetime:
        """Expiry as an aware datetime."""
        return datetime.strptime(self.expires, _TS).replace(tzinfo=timezone.utc)


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_claim(
    claim: Claim, secret: str, *, fleet: str, groups: tuple[str, ...] | list[str], now: datetime
) -> None:
    """Raise ClaimError unless ``secret`` opens ``claim`` for ``groups`` in ``fleet`` at ``now`` (pure)."""
    if not hmac.compare_digest(claim.secret_sha256, _hash(secret)):
        raise ClaimError(f"claim {claim.id}: wrong secret")
    if claim.fleet != fleet:
        raise ClaimError(
            f"claim {claim.id} belongs to fleet {claim.fleet}, not {fleet}",
            hint="use a bundle made for this fleet",
        )
    if claim.revoked:
        raise ClaimError(f"claim {claim.id} was revoked", hint="ask the fleet operator for a new bundle")
    if now >= claim.expires_at:
        raise ClaimError(
            f"claim {claim.id} expired on {claim.expires}", hint="ask the fleet operator for a new bundle"
        )
    if claim.uses >= claim.max_uses:
        raise ClaimError(
            f"claim {claim.id} is used up ({claim.uses} of {claim.max_uses} devices enrolled)",
            hint="ask the fleet operator for a new bundle",
        )
    extra = sorted(set(groups) - set(claim.groups))
    if not groups or extra:
        raise ClaimError(
            f"claim {claim.id} does not allow groups {extra or '(none)'}",
            hint=f"allowed groups: {', '.join(claim.groups)}",
        )


def _claims_dir(fleet: FleetDir) -> Path:
    return fleet.path / CLAIMS_DIR


def _path(fleet: FleetDir, claim_id: str) -> Path:
    check_id(claim_id, "claim id")
    return _claims_dir(fleet) / f"{claim_id}.json"


@contextlib.contextmanager
def _locked(fleet: FleetDir) -> Iterator[None]:
    ensure_private_dir(_claims_dir(fleet))
    with open(_claims_dir(fleet) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _write(fleet: FleetDir, claim: Claim) -> None:
    FileSystem().atomic_write(
        _path(fleet, claim.id), [json.dumps(claim.to_json(), indent=2).encode()], mode=0o600, step="claim"
    )


def create_claim(
    fleet: FleetDir,
    *,
    groups: list[str] | tuple[str, ...],
    lifetime: timedelta,
    uses: int,
    now: datetime | None = None,
) -> tuple[Claim, str]:
    """A new claim and its secret (shown once: it goes into the bundle, only its hash is kept)."""
    if not groups:
        raise ConfigError("a claim needs at least one group", hint="pass --groups G[,G...]")
    for g in groups:
        check_id(g, "group")
    if uses < 1:
        raise ConfigError(f"--uses must be at least 1, got {uses}")
    if lifetime > MAX_CLAIM_LIFETIME:
        raise ConfigError(
            f"a claim may live at most {MAX_CLAIM_LIFETIME.days} days",
            hint="claims are for one install trip; make a new bundle for the next",
        )
    now = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(24)).decode().rstrip("=")
    claim = Claim(
        CLAIM_PREFIX + secrets.token_hex(6),
        fleet.id,
        _hash(secret),
        tuple(groups),
        (now + lifetime).strftime(_TS),
        uses,
        created=now.strftime(_TS),
    )
    with _locked(fleet):
        _write(fleet, claim)
    return claim, secret


def load_claim(fleet: FleetDir, claim_id: str) -> Claim:
    """One stored claim; ClaimError if there is none of that id."""
    p = _path(fleet, claim_id)
    try:
        return Claim.from_json(json.loads(p.read_text(encoding="utf-8")), str(p))
    except FileNotFoundError:
        raise ClaimError(
            f"unknown claim {claim_id}", hint="'edgert provision claims list' shows them"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"claim record {p} is unreadable: {exc}") from None


def list_claims(fleet: FleetDir) -> list[Claim]:
    """Every stored claim, by id."""
    d = _claims_dir(fleet)
    return [load_claim(fleet, p.stem) for p in sorted(d.glob(f"{CLAIM_PREFIX}*.json"))] if d.is_dir() else []


def revoke_claim(fleet: FleetDir, claim_id: str) -> Claim:
    """Mark a claim revoked (devices already enrolled with it keep their certificates)."""
    with _locked(fleet):
        claim = replace(load_claim(fleet, claim_id), revoked=True)
        _write(fleet, claim)
    return claim


def use_claim(
    fleet: FleetDir,
    claim_id: str,
    secret: str,
    *,
    device: str,
    groups: tuple[str, ...],
    now: datetime,
    on_accept: Callable[[Claim], None],
) -> Claim:
    """Check the claim and, under the claims lock, run ``on_accept`` then count the use.

    A device that enrolls again with the same claim (its first answer was lost) does not use it twice.
    """
    with _locked(fleet):
        claim = load_claim(fleet, claim_id)
        again = device in claim.devices
        check_claim(
            replace(claim, uses=claim.uses - 1) if again else claim,
            secret,
            fleet=fleet.id,
            groups=groups,
            now=now,
        )
        on_accept(claim)
        if not again:
            claim = replace(claim, uses=claim.uses + 1, devices=(*claim.devices, device))
            _write(fleet, claim)
    return claim


def enroll_request_topic(fleet: str, claim_id: str) -> str:
    """Where a claim holder publishes its enrollment request."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/enroll/{check_id(claim_id, 'claim id')}/request"


def enroll_reply_topic(fleet: str, claim_id: str) -> str:
    """Where the controller answers (the request's nonce tells concurrent devices apart)."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/enroll/{check_id(claim_id, 'claim id')}/reply"


def claim_acl(fleet: str) -> str:
    """Mosquitto ACL lines that confine every claim user (username = claim id) to its own two topics."""
    return (
        f"pattern write {PREFIX}/{fleet}/enroll/%u/request\npattern read {PREFIX}/{fleet}/enroll/%u/reply\n"
    )


class EnrollmentHandler:
    """Controller attachment: answers enrollment requests (``topics(fleet)`` / ``handle(...)``)."""

    def __init__(
        self, fleet: FleetDir, *, clock: Callable[[], datetime] | None = None, cert_days: int | None = None
    ) -> None:
        self.fleet = fleet
        self.clock = clock or (lambda: datetime.now(timezone.utc))
        self.cert_days = cert_days
        self.counters = {"enrolled": 0, "refused": 0, "malformed": 0}

    def topics(self, fleet: str) -> list[str]:
        """The claim request topics of this fleet."""
        return [f"{PREFIX}/{check_id(fleet, 'fleet id')}/enroll/+/request"]

    def handle(self, topic: str, payload: bytes, publish: Callable[[str, bytes, bool], None]) -> None:
        """Answer one enrollment request; never raises (bad requests get a refusal, or nothing)."""
        parts = topic.split("/")
        if len(parts) != 6 or parts[2] != self.fleet.id or parts[3] != "enroll" or parts[5] != "request":
            return
        claim_id = parts[4]
        try:
            if len(payload) > MAX_REQUEST_BYTES:
                raise ValueError("too large")
            doc = json.loads(payload)
            nonce = str(doc["nonce"])[:64]
            device = check_id(str(doc["device"]), "device id")
            groups = tuple(check_id(str(g), "group") for g in doc["groups"])
            csr, x25519, secret = str(doc["csr"]).encode(), str(doc["x25519"]), str(doc["secret"])
        except (ValueError, KeyError, TypeError, RecursionError, EdgertError):
            self.counters["malformed"] += 1
            return
        reply = enroll_reply_topic(self.fleet.id, claim_id)
        try:
            cert: list[bytes] = []

            def accept(_claim: Claim) -> None:
                kw = {"days": self.cert_days} if self.cert_days else {}
                cert.append(
                    sign_device_csr(
                        self.fleet.ca_key_path, self.fleet.ca_cert_path, csr, device, now=self.clock(), **kw
                    )
                )
                add_device(self.fleet, device, groups=groups, x25519=x25519, now=self.clock(), replace=True)

            use_claim(
                self.fleet, claim_id, secret, device=device, groups=groups, now=self.clock(), on_accept=accept
            )
        except EdgertError as exc:
            self.counters["refused"] += 1
            log.info("enrollment refused", extra={"claim": claim_id, "device": device, "reason": exc.message})
            out = {"v": 1, "nonce": nonce, "ok": False, "error": exc.message, "hint": exc.hint}
            publish(reply, json.dumps(out).encode(), False)
            return
        self.counters["enrolled"] += 1
        ca_pem = self.fleet.ca_cert_path.read_text(encoding="ascii")
        out = {"v": 1, "nonce": nonce, "ok": True, "device": device, "cert": cert[0].decode(), "ca": ca_pem}
        publish(reply, json.dumps(out).encode(), False)
