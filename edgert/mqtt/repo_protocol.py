"""The fleet repository request/reply codec and the desired-state signature (FLEET_CONTRACT). Pure: no I/O.

Devices fetch TUF metadata, targets and their wrapped-key records from the controller over MQTT::

    device -> edgert/v1/F/repo/req/D      {"v":1, "id", "path", "offset", "length" <= 65536}  (JSON)
    device <- edgert/v1/F/devices/D/repo  u32 BE header length | header JSON | raw bytes

The reply header is ``{"v":1, "id", "status": "ok"|"not_found"|"error", "offset", "total", "message"?}``.
``path`` is ``metadata/<file>``, ``targets/<file>`` or ``keys/<target path>``; :func:`check_repo_path`
is the one rule both sides apply (no ``..``, no absolute paths, a small character set).

Desired-state documents (group ``deployment`` and device ``assignment``) are signed with the fleet
command key: Ed25519 over the canonical JSON of the document without ``sig``
(:func:`desired_signed_bytes`), so the fleet and the device share one definition.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgert.errors import SignatureError, SyncError
from edgert.mqtt.topics import PREFIX, check_id

__all__ = [
    "MAX_CHUNK",
    "MAX_REPLY_HEADER_BYTES",
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "REPO_KINDS",
    "STATUSES",
    "RepoProtocolError",
    "RepoReply",
    "RepoRequest",
    "assignment_topic",
    "check_repo_path",
    "decode_reply",
    "decode_request",
    "desired_signed_bytes",
    "encode_reply",
    "encode_request",
    "reply_topic",
    "request_device",
    "request_filter",
    "request_topic",
    "sign_desired_state",
    "verify_desired_signature",
]

PROTOCOL_VERSION = 1
#: Largest chunk one request may ask for (bytes); replies stay far below MQTT's 128 KB limits.
MAX_CHUNK = 65536
#: Largest request document accepted (bytes).
MAX_REQUEST_BYTES = 2048
#: Largest reply header accepted (bytes).
MAX_REPLY_HEADER_BYTES = 4096
#: Longest repository path (characters) and request id.
MAX_PATH_CHARS = 512
MAX_ID_CHARS = 64
#: Largest file offset or size a peer may claim (1 TiB): keeps every number a sane int.
MAX_OFFSET = 1 << 40
REPO_KINDS = ("metadata", "targets", "keys")
STATUSES = ("ok", "not_found", "error")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_HEADER_LEN = struct.Struct(">I")


class RepoProtocolError(SyncError):
    """A repository request or reply is malformed (the message names the field)."""


def request_topic(fleet: str, device: str) -> str:
    """Where device ``device`` publishes its repository requests."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/repo/req/{check_id(device, 'device id')}"


def request_filter(fleet: str) -> str:
    """The controller's subscription: every device's requests."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/repo/req/+"


def reply_topic(fleet: str, device: str) -> str:
    """Where the controller answers device ``device`` (inside the device's own subtree, for the ACL)."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/devices/{check_id(device, 'device id')}/repo"


def assignment_topic(fleet: str, device: str) -> str:
    """The retained per-device desired state during a rollout."""
    return f"{PREFIX}/{check_id(fleet, 'fleet id')}/devices/{check_id(device, 'device id')}/assignment"


def request_device(topic: str, fleet: str) -> str | None:
    """The device id of a request topic of ``fleet``, or None if ``topic`` is not one."""
    prefix = f"{PREFIX}/{fleet}/repo/req/"
    if not topic.startswith(prefix):
        return None
    device = topic[len(prefix):]
    try:
        return check_id(device, "device id")
    except SyncError:
        return None


def check_repo_path(path: Any) -> tuple[str, str]:
    """Split a request path into (kind, rest); refuse anything that could leave the repository."""
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH_CHARS:
        raise RepoProtocolError(f"repository path must be a string of 1..{MAX_PATH_CHARS} characters")
    kind, _, rest = path.partition("/")
    segments = rest.split("/")
    if kind not in REPO_KINDS or not rest:
        raise RepoProtocolError(
            f"repository path {path[:80]!r} must start with one of {', '.join(k + '/' for k in REPO_KINDS)}")
    for seg in segments:
        if seg in (".", "..") or not _SEGMENT_RE.fullmatch(seg):
            raise RepoProtocolError(
                f"repository path {path[:80]!r} is refused: segments are 1-255 characters of "
                "A-Z a-z 0-9 . _ - and never '.' or '..' (no absolute paths, no empty segments)")
    return kind, rest


def _int(doc: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RepoProtocolError(f"field {key!r} must be an integer in {lo}..{hi}")
    return value


def _ident(doc: Mapping[str, Any]) -> str:
    value = doc.get("id")
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise RepoProtocolError("field 'id' must be 1-64 characters of A-Z a-z 0-9 . _ -")
    return value


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RepoProtocolError(f"{what} is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise RepoProtocolError(f"{what} must be a JSON object")
    if doc.get("v") != PROTOCOL_VERSION:
        raise RepoProtocolError(f"{what} has unsupported version {str(doc.get('v'))[:20]!r}; "
                                f"expected {PROTOCOL_VERSION}")
    return doc


@dataclass(frozen=True)
class RepoRequest:
    """One request for ``length`` bytes of ``path`` from ``offset``."""

    id: str
    path: str
    offset: int
    length: int


def encode_request(req: RepoRequest) -> bytes:
    """The wire bytes of a request (validated first)."""
    check_repo_path(req.path)
    doc = {"v": PROTOCOL_VERSION, "id": req.id, "path": req.path, "offset": req.offset, "length": req.length}
    _ident(doc), _int(doc, "offset", 0, MAX_OFFSET), _int(doc, "length", 1, MAX_CHUNK)
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_request(payload: bytes) -> RepoRequest:
    """Parse and validate a request; RepoProtocolError names what is wrong."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise RepoProtocolError(f"request is {len(payload)} bytes; the limit is {MAX_REQUEST_BYTES}")
    doc = _json_object(payload, "request")
    path = doc.get("path")
    check_repo_path(path)
    return RepoRequest(_ident(doc), str(path), _int(doc, "offset", 0, MAX_OFFSET),
                       _int(doc, "length", 1, MAX_CHUNK))


@dataclass(frozen=True)
class RepoReply:
    """One reply: ``data`` holds bytes ``offset..offset+len(data)`` of a file of ``total`` bytes."""

    id: str
    status: str
    offset: int = 0
    total: int = 0
    data: bytes = b""
    message: str | None = None


def encode_reply(reply: RepoReply) -> bytes:
    """The wire bytes of a reply: u32 BE header length, header JSON, raw data."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.id, "status": reply.status,
                              "offset": reply.offset, "total": reply.total}
    if reply.message is not None:
        header["message"] = reply.message[:500]
    raw = json.dumps(header, separators=(",", ":")).encode()
    return _HEADER_LEN.pack(len(raw)) + raw + reply.data


def decode_reply(payload: bytes) -> RepoReply:
    """Parse a reply; RepoProtocolError if the framing or the header is wrong."""
    if len(payload) < _HEADER_LEN.size:
        raise RepoProtocolError("reply is shorter than its length prefix")
    (size,) = _HEADER_LEN.unpack_from(payload)
    if size > MAX_REPLY_HEADER_BYTES or _HEADER_LEN.size + size > len(payload):
        raise RepoProtocolError(f"reply header length {size} is out of bounds")
    doc = _json_object(payload[_HEADER_LEN.size:_HEADER_LEN.size + size], "reply header")
    status = doc.get("status")
    if status not in STATUSES:
        raise RepoProtocolError(f"reply status must be one of {', '.join(STATUSES)}")
    data = payload[_HEADER_LEN.size + size:]
    if len(data) > MAX_CHUNK:
        raise RepoProtocolError(f"reply carries {len(data)} bytes; the limit is {MAX_CHUNK}")
    message = doc.get("message")
    return RepoReply(_ident(doc), str(status), _int(doc, "offset", 0, MAX_OFFSET),
                     _int(doc, "total", 0, MAX_OFFSET), data,
                     message[:500] if isinstance(message, str) else None)


# -- desired-state signature ------------------------------------------------------------------------
def desired_signed_bytes(doc: Mapping[str, Any]) -> bytes:
    """What the fleet command key signs: canonical JSON of the document without ``sig``."""
    from edgert.security.package import canonical_json

    return canonical_json({k: v for k, v in doc.items() if k != "sig"})


def sign_desired_state(doc: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """``doc`` with its ``sig`` (base64 Ed25519 over :func:`desired_signed_bytes`)."""
    sig = key.sign(desired_signed_bytes(doc))
    return {**{k: v for k, v in doc.items() if k != "sig"}, "sig": base64.b64encode(sig).decode("ascii")}


def verify_desired_signature(doc: Mapping[str, Any], key: Ed25519PublicKey) -> None:
    """Raise SignatureError unless ``doc`` carries a valid fleet signature."""
    sig = doc.get("sig")
    if not isinstance(sig, str):
        raise SignatureError("desired-state document is unsigned",
                             hint="publish it with the fleet command key ('edgert fleet deploy')")
    try:
        key.verify(base64.b64decode(sig, validate=True), desired_signed_bytes(doc))
    except (InvalidSignature, binascii.Error, ValueError, TypeError, RecursionError):
        raise SignatureError("desired-state document has a bad fleet signature; it was ignored",
                             hint="check that the device pins the fleet's command key") from None
