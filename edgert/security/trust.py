"""Publisher keys, and the publishers a device trusts to sign the packages it installs.

A fleet signs packages with an Ed25519 *publisher* key (``edgert package keygen``); a device pins
the public half (``edgert keys trust ed25519:...``) in ``<state>/trust/publishers/<fp>.pub``
(0600 files in a 0700 directory, written atomically), and the daemon config may add more. The
store installs a package only if its signature verifies and its signer is pinned, or is this
device's own signing key (a local import: origin "local"). :func:`check_origin` is that decision:
pure, given the header, the trusted set and the device's own public key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.errors import KeyFileError, UntrustedSignerError
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.keys import (
    check_private_file,
    fingerprint,
    format_public_key,
    load_private_key_file,
    parse_typed_public_key,
)

__all__ = [
    "ORIGIN_LOCAL",
    "ORIGIN_PUBLISHER",
    "Origin",
    "TrustedPublishers",
    "check_origin",
    "generate_publisher_key",
    "load_publisher_key",
    "parse_publisher_key",
    "publisher_fingerprint",
    "trust_dir",
    "trust_publisher",
    "untrust_publisher",
]

ED25519_PREFIX = "ed25519:"
#: Where pinned publisher keys live, relative to the state directory.
TRUST_SUBDIR = Path("trust") / "publishers"
PUB_SUFFIX = ".pub"
ORIGIN_PUBLISHER = "publisher"
ORIGIN_LOCAL = "local"
SOURCE_PINNED = "pinned"
SOURCE_CONFIG = "config"
_FP_RE = re.compile(r"^[0-9a-f]{32}$")


class _Audit(Protocol):
    def append(self, event: str, **fields: Any) -> Any: ...


def trust_dir(state_dir: Path) -> Path:
    """The directory of pinned publisher keys under a state directory."""
    return Path(state_dir) / TRUST_SUBDIR


def publisher_fingerprint(public: ed25519.Ed25519PublicKey) -> str:
    """Fingerprint of a publisher key (hex of the first 16 bytes of the raw key's sha256)."""
    return fingerprint(public)


def parse_publisher_key(text: str) -> ed25519.Ed25519PublicKey:
    """Parse a publisher public key given as ``ed25519:<base64>`` or a PEM public key."""
    key: ed25519.Ed25519PublicKey = parse_typed_public_key(
        text, ED25519_PREFIX, ed25519.Ed25519PublicKey, what="publisher public key",
        hint="use the 'ed25519:...' line printed by 'edgert package keygen'")
    return key


def generate_publisher_key(path: Path, *, fs: FileSystem | None = None) -> ed25519.Ed25519PublicKey:
    """Create a publisher signing key at ``path`` (0600 PKCS#8 PEM); refuse to overwrite one."""
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path} already exists",
                           hint="choose another path; a signing key is never overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    (fs or FileSystem()).atomic_write(path, [pem], mode=0o600, step="publisher-key")
    return key.public_key()


def load_publisher_key(path: Path) -> ed25519.Ed25519PrivateKey:
    """Load a publisher signing key (refusing loose permissions or another key type)."""
    key = load_private_key_file(Path(path))
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 private key",
                           hint="make a publisher key with 'edgert package keygen -o publisher.key'")
    return key


@dataclass(frozen=True)
class TrustedPublishers:
    """The publisher keys a device trusts, by fingerprint, and where each came from."""

    keys: Mapping[str, ed25519.Ed25519PublicKey] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, state_dir: Path, extra: Iterable[str] = ()) -> TrustedPublishers:
        """Pinned keys from ``<state>/trust/publishers`` plus ``extra`` key texts (from config)."""
        keys: dict[str, ed25519.Ed25519PublicKey] = {}
        sources: dict[str, str] = {}
        directory = trust_dir(state_dir)
        files = sorted(directory.glob(f"*{PUB_SUFFIX}")) if directory.is_dir() else []
        for path in files:
            check_private_file(path)  # a key anyone could write would let anyone add trust
            try:
                public = parse_publisher_key(path.read_text())
            except (KeyFileError, OSError, UnicodeDecodeError) as exc:
                raise KeyFileError(f"pinned publisher key {path} is unreadable or malformed",
                                   hint="remove it and trust the key again with 'edgert keys trust'") from exc
            fp = fingerprint(public)
            if path.name != fp + PUB_SUFFIX:
                raise KeyFileError(f"pinned publisher key {path} holds key {fp}, not the one its name says",
                                   hint="remove the file and trust the key again with 'edgert keys trust'")
            keys[fp], sources[fp] = public, SOURCE_PINNED
        extra_set = cls.from_keys(extra)
        for fp, public in extra_set.keys.items():
            if fp not in keys:
                keys[fp], sources[fp] = public, SOURCE_CONFIG
        return cls(keys, sources)

    @classmethod
    def from_keys(cls, texts: Iterable[str], source: str = SOURCE_CONFIG) -> TrustedPublishers:
        """A set of ``ed25519:...`` key texts (no files read)."""
        keys = {fingerprint(k): k for k in (parse_publisher_key(t) for t in texts)}
        return cls(keys, {fp: source for fp in keys})

    def __contains__(self, fp: object) -> bool:
        return fp in self.keys

    def fingerprints(self) -> list[str]:
        """Trusted fingerprints, sorted."""
        return sorted(self.keys)

    def describe(self) -> list[dict[str, str]]:
        """JSON-ready list: fingerprint, public key text and source (pinned or config)."""
        return [{"fingerprint": fp, "public_key": format_public_key(self.keys[fp]),
                 "source": self.sources[fp]} for fp in self.fingerprints()]


def trust_publisher(state_dir: Path, public: ed25519.Ed25519PublicKey, *, audit: _Audit | None = None,
                    fs: FileSystem | None = None) -> tuple[str, bool]:
    """Pin a publisher key; return its fingerprint and whether it was new. Audited."""
    fp = fingerprint(public)
    directory = ensure_private_dir(trust_dir(state_dir))
    os.chmod(directory, 0o700)
    path = directory / f"{fp}{PUB_SUFFIX}"
    if path.exists():
        return fp, False
    (fs or FileSystem()).atomic_write(path, [(format_public_key(public) + "\n").encode("ascii")],
                                      mode=0o600, step="trust")
    if audit is not None:
        audit.append("publisher_trusted", fingerprint=fp, public_key=format_public_key(public))
    return fp, True


def untrust_publisher(state_dir: Path, fp: str, *, audit: _Audit | None = None,
                      fs: FileSystem | None = None) -> bool:
    """Remove a pinned publisher key by fingerprint; return whether it was pinned. Audited.

    Packages already installed stay installed: trust is checked when a package is installed.
    """
    if not _FP_RE.match(fp):
        return False
    path = trust_dir(state_dir) / f"{fp}{PUB_SUFFIX}"
    if not path.is_file():
        return False
    (fs or FileSystem()).remove(path, step="untrust")
    if audit is not None:
        audit.append("publisher_untrusted", fingerprint=fp)
    return True


@dataclass(frozen=True)
class Origin:
    """Who signed an accepted package: a trusted publisher, or this device (a local import)."""

    kind: str
    signer: str


def check_origin(header: Any, trusted: TrustedPublishers,
                 local: ed25519.Ed25519PublicKey | None = None) -> Origin:
    """Accept a package header's signer or raise (SignatureError: unsigned/bad; UntrustedSignerError).

    ``header`` is a :class:`edgert.security.package.PackageHeader`; ``local`` is this device's
    own signing key, accepted with origin "local".
    """
    public = header.verify_signature()
    fp = fingerprint(public)
    if fp in trusted:
        return Origin(ORIGIN_PUBLISHER, fp)
    if local is not None and fp == fingerprint(local):
        return Origin(ORIGIN_LOCAL, fp)
    m = header.manifest
    raise UntrustedSignerError(
        f"package {m.name} {m.version} is signed by publisher {fp}, which this device does not trust",
        hint=f"if you trust that publisher, run 'edgert keys trust {format_public_key(public)}' "
             "(check the key with its owner first)")
