"""Fleet-signed device commands: the signing side (fleet) and verification (device). Pure logic.

Wire format of a command (JSON, < 64 KiB)::

    {"v": 1, "body": "<JSON text of the command>", "sig": "<base64 Ed25519 signature>"}

The signature covers ``DOMAIN + body`` (the exact bytes of the body string in UTF-8), so no JSON
canonicalisation is needed. The body carries ``cmd``, ``args``, ``fleet``, ``device`` (the
command is bound to one device), ``nonce``, ``iat`` and ``exp`` (unix seconds) and an optional
``request_id``. Verification takes ``now`` so tests can move time.

Verification never raises anything but :class:`CommandRejected`, whose ``code`` is one of
:data:`REFUSAL_CODES`, whatever the payload holds: invalid UTF-8 or lone surrogates, ``NaN`` or
``Infinity``, numbers of hundreds of digits, nesting bombs, values of any JSON type in any field.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgert.errors import KeyFileError

__all__ = [
    "COMMAND_VERSION",
    "DOMAIN",
    "MAX_COMMAND_BYTES",
    "MAX_COMMAND_TIME_S",
    "MAX_COMMAND_TTL_S",
    "REFUSAL_CODES",
    "CommandRejected",
    "NonceCache",
    "NonceStore",
    "SignedCommand",
    "load_private_key",
    "load_public_key",
    "sign_command",
    "verify_command",
]

COMMAND_VERSION = 1
DOMAIN = b"edgert-command-v1\n"
MAX_COMMAND_BYTES = 64 * 1024
#: Longest validity a command may claim (``exp - iat``); bounds the nonce cache and the replay window.
MAX_COMMAND_TTL_S = 600.0
#: ``iat`` and ``exp`` are unix seconds in 0..this (9999-12-31T23:59:59Z); anything else is ``bad_time``.
MAX_COMMAND_TIME_S = 253_402_300_799
#: Tolerated clock skew between the fleet signer and the device.
CLOCK_SKEW_S = 60.0
MAX_NONCES = 100_000
_NONCE_CHARS = set("0123456789abcdefABCDEF-_")
#: Every code :func:`verify_command` refuses with (the reply's ``error.code``; docs/mqtt.md lists them).
REFUSAL_CODES = frozenset({
    "unsigned", "bad_signature", "wrong_device", "expired", "bad_time", "replayed", "malformed",
    "too_large", "bad_version", "busy",
})


class CommandRejected(Exception):
    """A command failed a check; ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SignedCommand:
    """A verified command body."""

    cmd: str
    args: Mapping[str, Any]
    fleet: str
    device: str
    nonce: str
    iat: float
    exp: float
    request_id: str | None = None


def sign_command(
    key: Ed25519PrivateKey,
    *,
    cmd: str,
    fleet: str,
    device: str,
    now: float,
    args: Mapping[str, Any] | None = None,
    ttl: float = 60.0,
    nonce: str | None = None,
    request_id: str | None = None,
) -> bytes:
    """Return the wire bytes of a signed command valid from ``now`` for ``ttl`` seconds."""
    body: dict[str, Any] = {
        "v": COMMAND_VERSION,
        "cmd": cmd,
        "args": dict(args or {}),
        "fleet": fleet,
        "device": device,
        "nonce": nonce or secrets.token_hex(16),
        "iat": round(now, 3),
        "exp": round(now + ttl, 3),
    }
    if request_id is not None:
        body["request_id"] = request_id
    body_text = json.dumps(body, separators=(",", ":"), sort_keys=True)
    sig = key.sign(DOMAIN + body_text.encode())
    return json.dumps(
        {"v": COMMAND_VERSION, "body": body_text, "sig": base64.b64encode(sig).decode()}
    ).encode()


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(text: str | bytes) -> Any:
    """Strict JSON: NaN and Infinity (which Python's json accepts) are refused as invalid."""
    return json.loads(text, parse_constant=_no_constants)


def _parse_envelope(payload: bytes) -> tuple[str, bytes]:
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandRejected(
            "too_large", f"command is {len(payload)} bytes; the limit is {MAX_COMMAND_BYTES}"
        )
    try:
        env = _loads(payload)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: "[[[[…"
        raise CommandRejected("malformed", "command is not valid JSON (UTF-8, no NaN/Infinity)") from None
    if not isinstance(env, dict):
        raise CommandRejected("malformed", "command must be a JSON object")
    if env.get("v") != COMMAND_VERSION:
        raise CommandRejected(
            "bad_version", f"unsupported command version {_short(env.get('v'))}; expected {COMMAND_VERSION}"
        )
    body, sig = env.get("body"), env.get("sig")
    if sig is None:
        raise CommandRejected("unsigned", "command carries no fleet signature")
    if not isinstance(body, str) or not isinstance(sig, str):
        raise CommandRejected("malformed", "command needs string fields 'body' and 'sig'")
    try:
        raw_sig = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):  # UnicodeEncodeError (non-ASCII) is a ValueError
        raise CommandRejected("bad_signature", "signature is not valid base64") from None
    return body, raw_sig


def _short(value: Any) -> str:
    """A bounded, always-printable rendering of an untrusted value for an error message."""
    try:
        text = repr(value)
    except ValueError:  # an int over the str() digit limit
        text = f"<{type(value).__name__}>"
    return text[:40] + ("…" if len(text) > 40 else "")


def _signed_bytes(body_text: str) -> bytes:
    try:
        return DOMAIN + body_text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") in the envelope's body string
        raise CommandRejected("malformed", "command body is not valid Unicode (lone surrogate)") from None


def _parse_time(body: Mapping[str, Any], name: str) -> float:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CommandRejected("malformed", f"signed body field {name!r} must be a number")
    # Compare ints before float(): a 400-digit integer would overflow it.
    if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= MAX_COMMAND_TIME_S:
        raise CommandRejected(
            "bad_time", f"signed body field {name!r} must be unix seconds in 0..{MAX_COMMAND_TIME_S}"
        )
    return float(value)


def _parse_body(body_text: str) -> dict[str, Any]:
    try:
        body = _loads(body_text)
    except (ValueError, RecursionError):
        raise CommandRejected("malformed", "signed body is not valid JSON (no NaN/Infinity)") from None
    if not isinstance(body, dict) or body.get("v") != COMMAND_VERSION:
        raise CommandRejected("bad_version", "signed body has an unsupported version")
    try:
        # Strings echoed into replies and the audit log (UTF-8) must be encodable: no lone surrogates.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError):
        raise CommandRejected("malformed", "signed body holds invalid Unicode (lone surrogate)") from None
    checks = {"cmd": str, "fleet": str, "device": str, "nonce": str, "args": dict}
    for name, typ in checks.items():
        if not isinstance(body.get(name), typ):
            raise CommandRejected(
                "malformed", f"signed body field {name!r} is missing or not a {typ.__name__}"
            )
    nonce = body["nonce"]
    if not 16 <= len(nonce) <= 64 or not set(nonce) <= _NONCE_CHARS:
        raise CommandRejected("malformed", "nonce must be 16-64 hex characters")
    rid = body.get("request_id")
    if rid is not None and (not isinstance(rid, str) or len(rid) > 128):
        raise CommandRejected("malformed", "request_id must be a string of at most 128 characters")
    return body


class NonceStore(Protocol):
    """Where verify_command records nonces: in memory (:class:`NonceCache`) or persistent."""

    def check_and_add(self, nonce: str, exp: float, now: float, *, iat: float | None = None) -> None:
        """Record ``nonce``; raise CommandRejected('replayed') if it was seen before."""


@dataclass
class NonceCache:
    """Nonces seen and their expiry; refuses a nonce twice while the command is still valid."""

    max_entries: int = MAX_NONCES
    _seen: dict[str, float] = field(default_factory=dict)

    def check_and_add(self, nonce: str, exp: float, now: float, *, iat: float | None = None) -> None:
        """Record ``nonce``; raise CommandRejected('replayed') if it was seen before."""
        if nonce in self._seen:
            raise CommandRejected("replayed", "command nonce was already used (replay refused)")
        if len(self._seen) >= self.max_entries:
            self._seen = {n: e for n, e in self._seen.items() if e + CLOCK_SKEW_S >= now}
            if len(self._seen) >= self.max_entries:
                # Never evict live nonces: that would reopen the replay window.
                raise CommandRejected("busy", "too many live commands; retry later")
        self._seen[nonce] = exp


def verify_command(
    payload: bytes,
    public_key: Ed25519PublicKey,
    *,
    fleet: str,
    device: str,
    now: float,
    nonces: NonceStore,
) -> SignedCommand:
    """Verify signature, binding, expiry and freshness; raise CommandRejected with a reason code."""
    body_text, sig = _parse_envelope(payload)
    try:
        public_key.verify(sig, _signed_bytes(body_text))
    except InvalidSignature:
        raise CommandRejected("bad_signature", "fleet signature does not verify") from None
    body = _parse_body(body_text)
    if body["fleet"] != fleet or body["device"] != device:
        raise CommandRejected("wrong_device", "command is signed for another fleet or device")
    iat, exp = _parse_time(body, "iat"), _parse_time(body, "exp")
    if exp <= now:
        raise CommandRejected("expired", "command has expired")
    if iat > now + CLOCK_SKEW_S or not 0 < exp - iat <= MAX_COMMAND_TTL_S:
        raise CommandRejected(
            "bad_time",
            f"command validity must start by now and last 0..{MAX_COMMAND_TTL_S:g} s (exp after iat)",
        )
    nonces.check_and_add(body["nonce"], exp, now, iat=iat)
    return SignedCommand(
        cmd=body["cmd"],
        args=body["args"],
        fleet=fleet,
        device=device,
        nonce=body["nonce"],
        iat=iat,
        exp=exp,
        request_id=body.get("request_id"),
    )


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load the pinned Ed25519 fleet command public key (PEM)."""
    p = Path(path)
    try:
        key = serialization.load_pem_public_key(p.read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"fleet command key {p} not found", hint="set [mqtt] command_key_file") from None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read fleet command key {p}: {type(exc).__name__}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{p} is not an Ed25519 public key", hint="use the fleet command key (Ed25519)")
    return key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load the fleet's Ed25519 signing key (PEM, must be mode 0600)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        data = p.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"signing key {p} not found") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read signing key {p}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"signing key {p} is readable by others", hint=f"chmod 600 {p}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise KeyFileError(f"{p} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{p} is not an Ed25519 private key")
    return key
