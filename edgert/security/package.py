"""The ``.edgepkg`` model package (format 2): signed manifest, wrapped keys, encrypted variants.

Layout::

    b"EDGEPKG\\0" | u32 big-endian header length | header (canonical JSON) | payload

The header is ``{"manifest": {...}, "signature": {...}, "recipients": [wrapped-key records]}``.
The manifest names the model (name, version, created, min_edgert) and lists its *variants* (an
int8 ONNX, an fp16 one, an Edge TPU .tflite, ...), each with its format, inputs/outputs, the
sha256 and size of its plaintext and where its encrypted payload sits (offset, size, sha256).

* **Origin.** ``signature`` is an Ed25519 signature by the publisher key over
  ``SIGN_LABEL || canonical(manifest)``: every variant's payload hash is covered. Who may sign is
  the device's decision (:mod:`edgert.security.trust`); this module only says whether it verifies.
* **Recipients** sit outside the signature, so a package can be re-wrapped for new devices
  (:func:`rewrap`) without the publisher signing again.
* **One package key per package**, wrapped once per recipient; each variant is encrypted with its
  own key derived from it (HKDF over the manifest binding and the variant index) and every chunk
  carries ``binding || index`` as associated data. So a variant's payload cannot be moved into
  another variant's slot, nor into another package, and N devices cost N wrapped keys, not N x V.
* The **binding** is sha256 over the manifest without the payload sha256s (they are only known
  after encryption); it is the AEAD associated data and the key-wrap context.

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

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgert.errors import IntegrityError, KeyFileError, ModelError, SignatureError
from edgert.security import envelope

__all__ = [
    "MAGIC",
    "MANIFEST_VERSION",
    "VARIANTS",
    "Manifest",
    "PackageHeader",
    "Variant",
    "VariantManifest",
    "VariantSource",
    "canonical_json",
    "compare_versions",
    "create_package",
    "decrypt_payload",
    "parse_version",
    "read_header",
    "rewrap",
    "variant_key",
    "variant_kind",
    "verify_package",
]

MAGIC = b"EDGEPKG\0"
MANIFEST_VERSION = 2
MAX_HEADER_SIZE = 1 << 20
#: Most variants one package may hold.
MAX_VARIANTS = 8
#: Largest reference profile (canonical JSON) a manifest carries; the header itself is capped at 1 MiB.
MAX_REFERENCE_BYTES = 256 * 1024
#: Variant kinds (precision / target); a variant id is a kind plus an optional suffix ("int8-tflite").
VARIANTS = ("int8", "fp16", "fp32", "edgetpu")
FORMATS = ("onnx", "tflite")
AEAD_NAME = "AES-256-GCM-STREAM"
KDF_NAME = "HKDF-SHA256"
SIGNATURE_ALG = "ed25519"
ED25519_PREFIX = "ed25519:"
_VERSION_RE = re.compile(r"^\d{1,9}(\.\d{1,9}){0,3}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_VARIANT_RE = re.compile(r"^(int8|fp16|fp32|edgetpu)(-[a-z0-9]{1,16})?$")
_BINDING_LABEL = b"edgert-pkg-v2\0"
_SIGN_LABEL = b"edgert-pkg-signature-v2\0"
_VARIANT_KEY_LABEL = b"edgert-pkg-variant-key-v2\0"
_HEADER_KEYS = {"manifest", "recipients", "signature"}
V1_MESSAGE = "package format 1 is no longer supported: re-create it with `edgert package create`"


def _fail() -> IntegrityError:
    return IntegrityError(envelope.INTEGRITY_MESSAGE)


#: What ``json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` builds on every call
#: (it keeps no state between calls); made once, as it runs two or three times per model load.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8 (no floats in manifests)."""
    return _CANONICAL.encode(obj).encode("utf-8")


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


def check_variant(variant: str) -> str:
    """Validate a variant id: a kind (int8, fp16, fp32, edgetpu) and an optional ``-suffix``."""
    if not isinstance(variant, str) or not _VARIANT_RE.match(variant):
        raise ModelError(f"unknown variant {variant!r}",
                         hint=f"use one of {', '.join(VARIANTS)}, optionally with a suffix such as "
                              "int8-tflite (lowercase letters and digits)")
    return variant


def variant_kind(variant: str) -> str:
    """The kind of a variant id: ``"int8-tflite"`` -> ``"int8"`` (what device profiles rank)."""
    return check_variant(variant).split("-", 1)[0]


@dataclass(frozen=True)
class Variant:
    """One variant of a model in a package, and where its encrypted payload sits."""

    index: int
    variant: str
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    plaintext_sha256: str
    plaintext_size: int
    chunk_size: int
    nonce_prefix: bytes
    payload_offset: int
    payload_size: int
    payload_sha256: str

    @property
    def kind(self) -> str:
        """int8, fp16, fp32 or edgetpu."""
        return self.variant.split("-", 1)[0]


def _parse_variant(index: int, doc: Any) -> Variant:
    if not isinstance(doc, dict):
        raise _fail()
    payload = doc["payload"]
    v = Variant(
        index=index, variant=check_variant(doc["variant"]), format=str(doc["format"]),
        inputs=list(doc["inputs"]), outputs=list(doc["outputs"]),
        plaintext_sha256=str(doc["plaintext_sha256"]), plaintext_size=int(doc["plaintext_size"]),
        chunk_size=int(doc["chunk_size"]), nonce_prefix=envelope.b64decode_canonical(doc["nonce_prefix"]),
        payload_offset=int(payload["offset"]), payload_size=int(payload["size"]),
        payload_sha256=str(payload["sha256"]))
    if (v.format not in FORMATS or len(v.nonce_prefix) != envelope.NONCE_PREFIX_SIZE
            or not 0 < v.chunk_size <= envelope.MAX_CHUNK_SIZE or v.plaintext_size < 0
            or v.payload_size != envelope.ciphertext_size(v.plaintext_size, v.chunk_size)):
        raise _fail()
    return v


@dataclass(frozen=True)
class Manifest:
    """What a package holds; parsed and validated from the header."""

    name: str
    version: str
    created: str
    min_edgert: str
    variants: tuple[Variant, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        """Validate a manifest document (format 1 and unknown formats are refused clearly)."""
        if not isinstance(doc, dict):
            raise _fail()
        mv = doc.get("manifest_version")
        if mv == 1:
            raise ModelError(V1_MESSAGE, hint="packages are now signed by a publisher key and may hold "
                                              "several variants; see docs/security.md")
        if mv != MANIFEST_VERSION:
            raise ModelError(f"package manifest version {mv!r} is not supported (this edgert reads "
                             f"version {MANIFEST_VERSION})", hint="upgrade edgert, or rebuild the package")
        try:
            enc = doc["encryption"]
            if enc["aead"] != AEAD_NAME or enc["kdf"] != KDF_NAME:
                raise ModelError(f"unsupported payload encryption {enc['aead']!r}/{enc['kdf']!r}",
                                 hint="upgrade edgert")
            docs = doc["variants"]
            if not isinstance(docs, list) or not 0 < len(docs) <= MAX_VARIANTS:
                raise _fail()
            manifest = cls(name=check_name(doc["name"]), version=str(doc["version"]),
                           created=str(doc["created"]), min_edgert=str(doc["min_edgert"]),
                           variants=tuple(_parse_variant(i, d) for i, d in enumerate(docs)), raw=doc)
        except (ModelError, IntegrityError):
            raise
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise _fail() from None
        parse_version(manifest.version)
        offset = 0
        for v in manifest.variants:  # payloads are back to back, in manifest order
            if v.payload_offset != offset:
                raise _fail()
            offset += v.payload_size
        if len(set(manifest.variant_names)) != len(manifest.variants):
            raise _fail()
        return manifest

    @property
    def variant_names(self) -> list[str]:
        """Variant ids in package order (the first is the default)."""
        return [v.variant for v in self.variants]

    @property
    def variant(self) -> str:
        """The default (first) variant's id (kept for callers of format 1)."""
        return self.variants[0].variant

    @property
    def format(self) -> str:
        """The default (first) variant's format."""
        return self.variants[0].format

    @property
    def payload_size(self) -> int:
        """Total encrypted payload size (every variant)."""
        return sum(v.payload_size for v in self.variants)

    def find(self, variant: str | None) -> Variant | None:
        """The variant with this id (None: the first), or None if the package has no such variant."""
        if variant is None:
            return self.variants[0]
        return next((v for v in self.variants if v.variant == variant), None)

    @property
    def reference(self) -> dict[str, Any] | None:
        """The reference profile of the model's data (signed with the manifest), or None (docs/drift.md)."""
        ref = self.raw.get("reference")
        return ref if isinstance(ref, dict) else None

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the canonical manifest (what the signature covers; identifies a build)."""
        return hashlib.sha256(canonical_json(self.raw)).hexdigest()

    @functools.cached_property
    def binding(self) -> bytes:
        """Digest of the manifest minus payload hashes: the key-wrap context and AEAD data base."""
        # Cached: needed for the key unwrap and again for the payload (a manifest is immutable).
        return binding_of(self.raw)

    @functools.cached_property
    def signed_bytes(self) -> bytes:
        """Exactly what the publisher signs: a domain label and the canonical manifest."""
        return _SIGN_LABEL + canonical_json(self.raw)

    def check_compatible(self, edgert_version: str) -> None:
        """Refuse a package that needs a newer edgert."""
        if compare_versions(self.min_edgert, edgert_version) > 0:
            raise ModelError(f"package {self.name} {self.version} needs edgert >= {self.min_edgert} "
                             f"(this is {edgert_version})", hint="upgrade edgert on this device")


@dataclass(frozen=True)
class VariantManifest:
    """One variant of an installed package: what :meth:`ModelStore.read_model_bytes` decrypted."""

    manifest: Manifest
    spec: Variant

    @property
    def name(self) -> str:
        """Model name."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Model version."""
        return self.manifest.version

    @property
    def variant(self) -> str:
        """Variant id."""
        return self.spec.variant

    @property
    def format(self) -> str:
        """onnx or tflite."""
        return self.spec.format

    @property
    def inputs(self) -> list[dict[str, Any]]:
        """Input specs."""
        return self.spec.inputs

    @property
    def outputs(self) -> list[dict[str, Any]]:
        """Output specs."""
        return self.spec.outputs

    @property
    def plaintext_size(self) -> int:
        """Plaintext size in bytes."""
        return self.spec.plaintext_size

    @property
    def plaintext_sha256(self) -> str:
        """Plaintext sha256."""
        return self.spec.plaintext_sha256


def binding_of(manifest_doc: dict[str, Any]) -> bytes:
    """sha256 over the canonical manifest without the variants' payload sha256s."""
    core = dict(manifest_doc)
    core["variants"] = [{**v, "payload": {k: x for k, x in v["payload"].items() if k != "sha256"}}
                        for v in manifest_doc["variants"]]
    return hashlib.sha256(_BINDING_LABEL + canonical_json(core)).digest()


def _variant_key(package_key: bytes, binding: bytes, index: int) -> bytes:
    info = _VARIANT_KEY_LABEL + binding + struct.pack(">I", index)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(package_key)


def variant_key(header: PackageHeader, key: bytes, variant: Variant) -> bytes:
    """The key ``variant``'s payload is encrypted with: HKDF of the package key, the binding and its index."""
    return _variant_key(key, header.manifest.binding, variant.index)


def _variant_aad(binding: bytes, index: int) -> bytes:
    return binding + struct.pack(">I", index)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class PackageHeader:
    """A parsed header: the manifest, its signature, the wrapped keys and where the payload starts."""

    manifest: Manifest
    recipients: list[dict[str, str]]
    payload_offset: int
    signature: dict[str, str] | None = None

    @property
    def signer_fingerprint(self) -> str | None:
        """The fingerprint the signature claims (checked by :meth:`verify_signature`)."""
        return self.signature.get("signer") if isinstance(self.signature, dict) else None

    def verify_signature(self) -> ed25519.Ed25519PublicKey:
        """The signer's public key if the signature verifies; SignatureError if absent or bad."""
        from edgert.security.keys import fingerprint

        m, sig = self.manifest, self.signature
        if sig is None:
            raise SignatureError(f"package {m.name} {m.version} is not signed",
                                 hint="re-create it with 'edgert package create --publisher-key FILE'")
        try:
            text = str(sig["public_key"])
            if sig["alg"] != SIGNATURE_ALG or not text.startswith(ED25519_PREFIX):
                raise ValueError("unsupported signature algorithm")
            public = ed25519.Ed25519PublicKey.from_public_bytes(
                envelope.b64decode_canonical(text[len(ED25519_PREFIX):]))
            if fingerprint(public) != sig["signer"]:
                raise ValueError("fingerprint mismatch")
            public.verify(envelope.b64decode_canonical(sig["sig"]), m.signed_bytes)
        except (KeyError, TypeError, ValueError, binascii.Error, InvalidSignature):
            raise SignatureError(f"package {m.name} {m.version} has a bad signature (claimed signer "
                                 f"{self.signer_fingerprint}): it was changed after signing",
                                 hint="get an intact copy from the publisher") from None
        return public

    def key_for(self, private: x25519.X25519PrivateKey, fp: str | None = None) -> bytes:
        """Unwrap the package key for this device's X25519 key (``fp``: its fingerprint, if known)."""
        from edgert.security.keys import fingerprint

        fp = fp or fingerprint(private.public_key())
        for record in self.recipients:
            if isinstance(record, dict) and record.get("recipient") == fp:
                return envelope.unwrap_key(record, private, self.manifest.binding)
        raise KeyFileError(f"package {self.manifest.name} {self.manifest.version} is not encrypted for this "
                           f"device (key {fp})",
                           hint="ask the fleet operator to wrap it for this device's public key "
                                "('edgert keys show')")

    def to_bytes(self) -> bytes:
        """The header exactly as it is written in a package file."""
        doc: dict[str, Any] = {"manifest": self.manifest.raw, "recipients": self.recipients}
        if self.signature is not None:
            doc["signature"] = self.signature
        body = canonical_json(doc)
        return MAGIC + struct.pack(">I", len(body)) + body


def read_header(reader: BinaryIO, what: str = "the file") -> PackageHeader:
    """Parse the header from the start of a package (does not decrypt or check the signature)."""
    head = reader.read(len(MAGIC) + 4)
    magic = head[: len(MAGIC)]
    if magic != MAGIC[: len(magic)]:  # a short read that matches is a damaged package, not another file
        raise ModelError(f"{what} is not an edgert package (no EDGEPKG header)",
                         hint="packages are made with 'edgert package create'; plaintext models are "
                              "imported with 'edgert models import'")
    if len(head) != len(MAGIC) + 4:
        raise _fail()
    (length,) = struct.unpack(">I", head[len(MAGIC):])
    if length > MAX_HEADER_SIZE:
        raise _fail()
    raw = reader.read(length)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _fail() from None
    if len(raw) != length or not isinstance(doc, dict) or not isinstance(doc.get("recipients"), list):
        raise _fail()
    if raw != canonical_json(doc):  # one byte sequence per header: no malleable re-encodings
        raise _fail()
    signature = doc.get("signature")
    if not set(doc) <= _HEADER_KEYS or (signature is not None and not isinstance(signature, dict)):
        raise _fail()
    return PackageHeader(Manifest.from_dict(doc.get("manifest")), doc["recipients"],
                         len(MAGIC) + 4 + length, signature)


class _Window:
    """A reader limited to the next ``size`` bytes of ``reader`` (one variant's payload)."""

    def __init__(self, reader: BinaryIO, size: int) -> None:
        self.reader, self.left = reader, size

    def readinto(self, buf: memoryview) -> int:
        """Read into ``buf`` without passing the window's end."""
        view = memoryview(buf)[: self.left]
        n = self.reader.readinto(view) or 0  # type: ignore[attr-defined]
        self.left -= n
        return n

    def read(self, n: int = -1) -> bytes:
        """Read at most ``n`` bytes of the window."""
        data = self.reader.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data


def decrypt_payload(reader: BinaryIO | memoryview, header: PackageHeader, key: bytes, *,
                    variant: Variant | None = None, out: bytearray | memoryview | None,
                    check_hashes: bool = False, derived: AESGCM | None = None) -> None:
    """Decrypt one variant (None: the first) into ``out``, or just verify it (``out=None``).

    ``reader`` is either a file positioned at the start of that variant's payload
    (``header.payload_offset + variant.payload_offset``) or a memoryview of exactly that payload.
    With ``check_hashes`` the payload and plaintext sha256 in the manifest are checked too.
    ``derived``: an ``AESGCM`` of :func:`variant_key` for this variant, if the caller already has one.
    """
    m = header.manifest
    v = variant or m.variants[0]
    payload_hash = hashlib.sha256() if check_hashes else None
    plain_hash = hashlib.sha256() if check_hashes else None
    source: Any = reader if isinstance(reader, memoryview) else _Window(reader, v.payload_size)
    cipher: bytes | AESGCM = derived if derived is not None else _variant_key(key, m.binding, v.index)
    envelope.decrypt_stream(
        cipher, v.nonce_prefix, source, _variant_aad(m.binding, v.index),
        plaintext_size=v.plaintext_size, chunk_size=v.chunk_size, out=out,
        on_ciphertext=payload_hash.update if payload_hash else None,
        on_plaintext=plain_hash.update if plain_hash else None)
    if payload_hash is not None and plain_hash is not None and (
            payload_hash.hexdigest() != v.payload_sha256 or plain_hash.hexdigest() != v.plaintext_sha256):
        raise _fail()


def verify_package(reader: BinaryIO, header: PackageHeader, key: bytes) -> None:
    """Decrypt every variant to nowhere and check every hash and that nothing follows (O(chunk) memory).

    ``reader`` must be positioned at ``header.payload_offset``.
    """
    for v in header.manifest.variants:
        decrypt_payload(reader, header, key, variant=v, out=None, check_hashes=True)
    if reader.read(1):
        raise _fail()


@dataclass(frozen=True)
class VariantSource:
    """A model file to package, already described by the caller (security/ loads no models)."""

    path: Path
    variant: str
    format: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]


def _hash_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def _check_reference(reference: Any) -> dict[str, Any]:
    """The reference profile as manifest data: a JSON object of at most MAX_REFERENCE_BYTES, no floats."""

    def floats(o: Any) -> bool:
        if isinstance(o, dict):
            return any(floats(v) for v in o.values())
        if isinstance(o, list):
            return any(floats(v) for v in o)
        return isinstance(o, float)

    if not isinstance(reference, dict) or floats(reference):
        raise ModelError("the reference profile must be a JSON object without floats",
                         hint="compute it with edgert.drift (edgert package create --reference DATA.npz)")
    if len(canonical_json(reference)) > MAX_REFERENCE_BYTES:
        raise ModelError(f"the reference profile is larger than {MAX_REFERENCE_BYTES} bytes")
    return reference


def build_manifest(sources: Sequence[VariantSource], *, name: str, version: str, now: datetime,
                   min_edgert: str, chunk_size: int,
                   reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest document with placeholder payload hashes (filled in after encryption).

    ``reference`` (the model's reference data profile, computed outside security/) is signed with it.
    """
    check_name(name)
    parse_version(version)
    parse_version(min_edgert)
    if not 0 < len(sources) <= MAX_VARIANTS:
        raise ModelError(f"a package holds 1 to {MAX_VARIANTS} variants, not {len(sources)}")
    variants, offset, seen = [], 0, set()
    for src in sources:
        check_variant(src.variant)
        if src.variant in seen:
            raise ModelError(f"variant {src.variant!r} is given twice",
                             hint="name one of them apart, e.g. MODEL.tflite:int8-tflite")
        if src.format not in FORMATS:
            raise ModelError(f"unsupported model format {src.format!r} for {src.path}",
                             hint=f"use one of {', '.join(FORMATS)}")
        seen.add(src.variant)
        try:
            plain_sha, plain_size = _hash_file(Path(src.path))
        except OSError as exc:
            raise ModelError(f"cannot read model file {src.path}: {exc.strerror}") from exc
        size = envelope.ciphertext_size(plain_size, chunk_size)
        variants.append({
            "variant": src.variant, "format": src.format, "inputs": list(src.inputs),
            "outputs": list(src.outputs), "plaintext_sha256": plain_sha, "plaintext_size": plain_size,
            "chunk_size": chunk_size, "nonce_prefix": _b64(envelope.new_nonce_prefix()),
            "payload": {"offset": offset, "size": size, "sha256": "0" * 64}})
        offset += size
    doc = {
        "manifest_version": MANIFEST_VERSION, "name": name, "version": version,
        "created": now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "min_edgert": min_edgert,
        "encryption": {"aead": AEAD_NAME, "kdf": KDF_NAME}, "variants": variants,
    }
    if reference is not None:
        doc["reference"] = _check_reference(reference)
    return doc


def sign_manifest(manifest_doc: dict[str, Any], signer: ed25519.Ed25519PrivateKey) -> dict[str, str]:
    """The header's ``signature`` record for a (complete) manifest document."""
    from edgert.security.keys import fingerprint, format_public_key

    public = signer.public_key()
    sig = signer.sign(_SIGN_LABEL + canonical_json(manifest_doc))
    return {"alg": SIGNATURE_ALG, "public_key": format_public_key(public), "signer": fingerprint(public),
            "sig": _b64(sig)}


def create_package(sources: Sequence[VariantSource], out: BinaryIO, *, name: str, version: str,
                   recipients: Sequence[x25519.X25519PublicKey], signer: ed25519.Ed25519PrivateKey,
                   now: datetime, suite: str | None = None, min_edgert: str = "0.1.0",
                   chunk_size: int = envelope.CHUNK_SIZE,
                   reference: dict[str, Any] | None = None) -> Manifest:
    """Encrypt every variant of ``sources`` into ``out`` (seekable), sign and wrap it; return the manifest.

    Plaintext is streamed, one chunk in memory at a time. ``signer`` is the publisher's Ed25519
    key (or, for a local import, the device's own signing key). ``reference``: the model's reference
    data profile (docs/drift.md), stored in the signed manifest.
    """
    if not recipients:
        raise KeyFileError("a package needs at least one recipient public key",
                           hint="pass --recipient x25519:... or --recipients-file")
    doc = build_manifest(sources, name=name, version=version, now=now, min_edgert=min_edgert,
                         chunk_size=chunk_size, reference=reference)
    key, binding = envelope.new_key(), binding_of(doc)
    wrapped = [envelope.wrap_key(key, r, binding, suite) for r in recipients]
    placeholder = {"alg": SIGNATURE_ALG, "public_key": format_key(signer.public_key()),
                   "signer": "0" * 32, "sig": _b64(bytes(64))}

    def header_bytes(signature: dict[str, str]) -> bytes:
        body = canonical_json({"manifest": doc, "recipients": wrapped, "signature": signature})
        return MAGIC + struct.pack(">I", len(body)) + body

    start = out.tell()
    out.write(header_bytes(placeholder))  # same length as the real header: only hashes/sig change
    for index, (src, vdoc) in enumerate(zip(sources, doc["variants"], strict=True)):
        vdoc["payload"]["sha256"] = _encrypt_into(
            out, Path(src.path), _variant_key(key, binding, index), base64.b64decode(vdoc["nonce_prefix"]),
            _variant_aad(binding, index), chunk_size)
    end = out.tell()
    out.seek(start)
    out.write(header_bytes(sign_manifest(doc, signer)))
    out.seek(end)
    return Manifest.from_dict(doc)


def format_key(public: ed25519.Ed25519PublicKey) -> str:
    """``ed25519:<base64>`` text form of a publisher public key."""
    from edgert.security.keys import format_public_key

    return format_public_key(public)


def _encrypt_into(out: BinaryIO, path: Path, key: bytes, prefix: bytes, aad: bytes, chunk_size: int) -> str:
    """Stream-encrypt ``path`` to ``out``; return the ciphertext sha256."""
    digest = hashlib.sha256()

    def sink(chunk: bytes) -> None:
        digest.update(chunk)
        out.write(chunk)

    # Hashing and writing release the GIL, so a second thread overlaps them with the next chunk's
    # read and encryption; one chunk in flight keeps the order and bounds memory.
    try:
        with open(path, "rb") as f, ThreadPoolExecutor(1, thread_name_prefix="edgert-pkg") as pool:
            pending: Future[None] | None = None
            for chunk in envelope.encrypt_stream(key, prefix, f, aad, chunk_size):
                if pending is not None:
                    pending.result()
                pending = pool.submit(sink, chunk)
            if pending is not None:
                pending.result()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from exc
    return digest.hexdigest()


def rewrap(reader: BinaryIO, out: BinaryIO, *, private: x25519.X25519PrivateKey,
           recipients: Sequence[x25519.X25519PublicKey], suite: str | None = None) -> PackageHeader:
    """Copy a package to ``out`` wrapped for ``recipients`` instead (``private`` must unwrap it now).

    The manifest, the payload and so the publisher's signature are unchanged.
    """
    if not recipients:
        raise KeyFileError("a package needs at least one recipient public key")
    header = read_header(reader)
    key = header.key_for(private)
    wrapped = [envelope.wrap_key(key, r, header.manifest.binding, suite) for r in recipients]
    new = PackageHeader(header.manifest, wrapped, 0, header.signature)
    out.write(new.to_bytes())
    reader.seek(header.payload_offset)
    while block := reader.read(1 << 20):
        out.write(block)
    return new
