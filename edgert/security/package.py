"""The ``.edgepkg`` model package: canonical-JSON manifest, wrapped keys, encrypted payload.

Layout::

    b"EDGEPKG\\0" | u32 big-endian header length | header (canonical JSON) | payload

The header is ``{"manifest": {...}, "recipients": [wrapped-key records]}``. The manifest names
the model (name, version, format, variant, inputs/outputs), the sha256 and size of the plaintext
and of the payload, the creation time and the minimum edgert version. Everything in the manifest
except the ``payload`` hashes is bound into every AEAD chunk and every wrapped key (the
*binding*), so a payload spliced under another manifest fails. The payload sha256 lets a TUF
target or any signature cover the package without decrypting it. Recipients sit outside the
manifest so a package can be re-wrapped for new devices without changing what was signed.

Versions are dotted non-negative integers ("3", "1.2", "2.0.10"), compared numerically part
by part with missing parts as 0, so "1.10" > "1.9" and "2" == "2.0".
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.hazmat.primitives.asymmetric import x25519

from edgert.errors import IntegrityError, KeyFileError, ModelError
from edgert.security import envelope

__all__ = [
    "MAGIC",
    "MANIFEST_VERSION",
    "VARIANTS",
    "Manifest",
    "PackageHeader",
    "canonical_json",
    "compare_versions",
    "create_package",
    "decrypt_payload",
    "parse_version",
    "read_header",
]

MAGIC = b"EDGEPKG\0"
MANIFEST_VERSION = 1
MAX_HEADER_SIZE = 1 << 20
VARIANTS = ("int8", "fp16", "fp32", "edgetpu")
AEAD_NAME = "AES-256-GCM-STREAM"
_VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BINDING_LABEL = b"edgert-pkg-v1\0"
IoDesc = tuple[list[dict[str, Any]], list[dict[str, Any]]]


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8 (no floats in manifests)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_version(version: str) -> tuple[int, ...]:
    """Parse a dotted-integer version into a comparable tuple (trailing zeros dropped)."""
    if not isinstance(version, str) or not _VERSION_RE.match(version):
        raise ModelError(f"invalid model version {version!r}",
                         hint="use dotted non-negative integers such as 3, 1.2 or 2.0.10")
    parts = [int(p) for p in version.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as version ``a`` is lower than, equal to or higher than ``b``."""
    pa, pb = parse_version(a), parse_version(b)
    return (pa > pb) - (pa < pb)


def check_name(name: str) -> str:
    """Validate a model name (it becomes a directory name in the store)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ModelError(f"invalid model name {name!r}",
                         hint="use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class Manifest:
    """What a package holds; parsed and validated from the header."""

    name: str
    version: str
    format: str
    variant: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    plaintext_sha256: str
    plaintext_size: int
    created: str
    min_edgert: str
    chunk_size: int
    nonce_prefix: bytes
    payload_sha256: str
    payload_size: int
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        """Validate a manifest document (unknown manifest versions are refused clearly)."""
        if not isinstance(doc, dict):
            raise IntegrityError(envelope.INTEGRITY_MESSAGE)
        mv = doc.get("manifest_version")
        if mv != MANIFEST_VERSION:
            raise ModelError(f"package manifest version {mv!r} is not supported (this edgert reads "
                             f"version {MANIFEST_VERSION})", hint="upgrade edgert, or rebuild the package")
        try:
            enc, payload = doc["encryption"], doc["payload"]
            if enc["aead"] != AEAD_NAME:
                raise ModelError(f"unsupported payload encryption {enc['aead']!r}", hint="upgrade edgert")
            manifest = cls(
                name=check_name(doc["name"]), version=doc["version"], format=doc["format"],
                variant=doc["variant"], inputs=list(doc["inputs"]), outputs=list(doc["outputs"]),
                plaintext_sha256=str(doc["plaintext_sha256"]), plaintext_size=int(doc["plaintext_size"]),
                created=str(doc["created"]), min_edgert=str(doc["min_edgert"]),
                chunk_size=int(enc["chunk_size"]),
                nonce_prefix=base64.b64decode(enc["nonce_prefix"], validate=True),
                payload_sha256=str(payload["sha256"]), payload_size=int(payload["size"]), raw=doc)
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise IntegrityError(envelope.INTEGRITY_MESSAGE) from None
        parse_version(manifest.version)
        bad_prefix = len(manifest.nonce_prefix) != envelope.NONCE_PREFIX_SIZE
        if manifest.format not in ("onnx", "tflite") or bad_prefix:
            raise IntegrityError(envelope.INTEGRITY_MESSAGE)
        if manifest.payload_size != envelope.ciphertext_size(manifest.plaintext_size, manifest.chunk_size):
            raise IntegrityError(envelope.INTEGRITY_MESSAGE)
        return manifest

    @functools.cached_property
    def binding(self) -> bytes:
        """Digest of the manifest minus payload hashes: the AEAD associated data and wrap context."""
        # Cached: it is needed for the key unwrap and again for the payload (a manifest is immutable).
        return binding_of(self.raw)

    def check_compatible(self, edgert_version: str) -> None:
        """Refuse a package that needs a newer edgert."""
        if compare_versions(self.min_edgert, edgert_version) > 0:
            raise ModelError(f"package {self.name} {self.version} needs edgert >= {self.min_edgert} "
                             f"(this is {edgert_version})", hint="upgrade edgert on this device")


def binding_of(manifest_doc: dict[str, Any]) -> bytes:
    """sha256 over the canonical manifest without its ``payload`` member."""
    core = {k: v for k, v in manifest_doc.items() if k != "payload"}
    return hashlib.sha256(_BINDING_LABEL + canonical_json(core)).digest()


@dataclass(frozen=True)
class PackageHeader:
    """A parsed header: the manifest, the wrapped keys and where the payload starts."""

    manifest: Manifest
    recipients: list[dict[str, str]]
    payload_offset: int

    def key_for(self, private: x25519.X25519PrivateKey, fp: str | None = None) -> bytes:
        """Unwrap the payload key for this device's X25519 key (``fp``: its fingerprint, if known)."""
        from edgert.security.keys import fingerprint

        fp = fp or fingerprint(private.public_key())
        for record in self.recipients:
            if isinstance(record, dict) and record.get("recipient") == fp:
                return envelope.unwrap_key(record, private, self.manifest.binding)
        raise KeyFileError(f"package {self.manifest.name} {self.manifest.version} is not encrypted for this "
                           f"device (key {fp})",
                           hint="ask the fleet operator to wrap it for this device's public key "
                                "('edgert keys show')")


def read_header(reader: BinaryIO) -> PackageHeader:
    """Parse the header from the start of a package (does not decrypt)."""
    head = reader.read(len(MAGIC) + 4)
    if len(head) != len(MAGIC) + 4 or head[: len(MAGIC)] != MAGIC:
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)
    (length,) = struct.unpack(">I", head[len(MAGIC):])
    if length > MAX_HEADER_SIZE:
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)
    raw = reader.read(length)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise IntegrityError(envelope.INTEGRITY_MESSAGE) from None
    if len(raw) != length or not isinstance(doc, dict) or not isinstance(doc.get("recipients"), list):
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)
    if raw != canonical_json(doc):  # one byte sequence per header: no malleable re-encodings
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)
    return PackageHeader(Manifest.from_dict(doc.get("manifest")), doc["recipients"], len(MAGIC) + 4 + length)


def decrypt_payload(reader: BinaryIO | memoryview, header: PackageHeader, key: bytes, *,
                    out: bytearray | memoryview | None, check_hashes: bool = False) -> None:
    """Decrypt (into ``out``) or just verify (``out=None``) the payload that follows the header.

    ``reader`` must be positioned at ``header.payload_offset``. With ``check_hashes`` the payload
    and plaintext sha256 in the manifest are checked too (done once, at install).
    """
    m = header.manifest
    payload_hash = hashlib.sha256() if check_hashes else None
    plain_hash = hashlib.sha256() if check_hashes else None
    envelope.decrypt_stream(
        key, m.nonce_prefix, reader, m.binding, plaintext_size=m.plaintext_size, chunk_size=m.chunk_size,
        out=out, on_ciphertext=payload_hash.update if payload_hash else None,
        on_plaintext=plain_hash.update if plain_hash else None)
    if payload_hash is not None and plain_hash is not None and (
            payload_hash.hexdigest() != m.payload_sha256 or plain_hash.hexdigest() != m.plaintext_sha256):
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def build_manifest(*, name: str, version: str, fmt: str, variant: str, inputs: list[dict[str, Any]],
                   outputs: list[dict[str, Any]], plaintext_sha256: str, plaintext_size: int, now: datetime,
                   min_edgert: str, chunk_size: int, nonce_prefix: bytes) -> dict[str, Any]:
    """A manifest document with a placeholder payload hash (filled in after encryption)."""
    check_name(name)
    parse_version(version)
    parse_version(min_edgert)
    if variant not in VARIANTS:
        raise ModelError(f"unknown variant {variant!r}", hint=f"use one of {', '.join(VARIANTS)}")
    return {
        "manifest_version": MANIFEST_VERSION, "name": name, "version": version, "format": fmt,
        "variant": variant, "inputs": inputs, "outputs": outputs,
        "plaintext_sha256": plaintext_sha256, "plaintext_size": plaintext_size,
        "created": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "min_edgert": min_edgert,
        "encryption": {"aead": AEAD_NAME, "chunk_size": chunk_size,
                       "nonce_prefix": base64.b64encode(nonce_prefix).decode("ascii")},
        "payload": {"sha256": "0" * 64, "size": envelope.ciphertext_size(plaintext_size, chunk_size)},
    }


def create_package(model_path: Path, out: BinaryIO, *, name: str, version: str, variant: str,
                   recipients: Sequence[x25519.X25519PublicKey], now: datetime,
                   fmt: str | None = None, io_desc: IoDesc | None = None,
                   suite: str | None = None, min_edgert: str = "0.1.0",
                   chunk_size: int = envelope.CHUNK_SIZE) -> Manifest:
    """Encrypt ``model_path`` into ``out`` (a seekable file) for ``recipients``; return the manifest.

    The plaintext is streamed, one chunk in memory at a time, unless ``io_desc`` is None, in which
    case the model is loaded once to read its inputs and outputs.
    """
    from edgert.security.modelinfo import describe_model, sniff_format

    if not recipients:
        raise KeyFileError("a package needs at least one recipient public key",
                           hint="pass --recipient x25519:... or --recipients-file")
    model_path = Path(model_path)
    try:
        with open(model_path, "rb") as f:
            head = f.read(8)
        fmt = fmt or sniff_format(head, model_path.name)
        if io_desc is None:
            io_desc = describe_model(model_path.read_bytes(), fmt)
        plain_sha, plain_size = _hash_file(model_path)
    except OSError as exc:
        raise ModelError(f"cannot read model file {model_path}: {exc.strerror}") from exc
    key, prefix = envelope.new_key(), envelope.new_nonce_prefix()
    doc = build_manifest(name=name, version=version, fmt=fmt, variant=variant, inputs=io_desc[0],
                         outputs=io_desc[1], plaintext_sha256=plain_sha, plaintext_size=plain_size, now=now,
                         min_edgert=min_edgert, chunk_size=chunk_size, nonce_prefix=prefix)
    binding = binding_of(doc)
    wrapped = [envelope.wrap_key(key, r, binding, suite) for r in recipients]

    def header_bytes() -> bytes:
        body = canonical_json({"manifest": doc, "recipients": wrapped})
        return MAGIC + struct.pack(">I", len(body)) + body

    start = out.tell()
    out.write(header_bytes())  # placeholder payload hash; same length as the real one
    digest = hashlib.sha256()

    def sink(chunk: bytes) -> None:
        digest.update(chunk)
        out.write(chunk)

    # Hashing and writing release the GIL, so a second thread overlaps them with the next chunk's
    # read and encryption; one chunk in flight keeps the order and bounds memory.
    with open(model_path, "rb") as f, ThreadPoolExecutor(1, thread_name_prefix="edgert-pkg") as pool:
        pending: Future[None] | None = None
        for chunk in envelope.encrypt_stream(key, prefix, f, binding, chunk_size):
            if pending is not None:
                pending.result()
            pending = pool.submit(sink, chunk)
        if pending is not None:
            pending.result()
    doc["payload"]["sha256"] = digest.hexdigest()
    end = out.tell()
    out.seek(start)
    out.write(header_bytes())
    out.seek(end)
    return Manifest.from_dict(doc)
