"""Device identity: X25519 (key wrapping), Ed25519 (audit checkpoints), ECDSA P-256 (TLS client).

Keys are generated on the device and never leave it. Private keys are PKCS#8 PEM files, mode
0600, in a 0700 directory. Loading refuses a keys directory or key files that are group- or
world-accessible or owned by another user, as ssh does. Public keys are exchanged as
``x25519:<base64>`` strings and identified by a fingerprint, ``sha256`` of the raw public key
(first 16 bytes, hex).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from edgert.errors import KeyFileError
from edgert.security.atomic import FileSystem, ensure_private_dir

__all__ = [
    "KEY_FILES",
    "DeviceKeys",
    "check_private_dir",
    "check_private_file",
    "fingerprint",
    "format_public_key",
    "init_keystore",
    "load_keystore",
    "load_private_key_file",
    "parse_public_key",
]

#: role -> file name inside the keys directory.
KEY_FILES = {"wrap": "x25519.pem", "sign": "ed25519.pem", "tls": "tls-p256.pem"}
X25519_PREFIX = "x25519:"
ED25519_PREFIX = "ed25519:"
_LOOSE_BITS = stat.S_IRWXG | stat.S_IRWXO


def _raw(public: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: x25519.X25519PublicKey | ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey) -> str:
    """Short stable identifier of a public key (hex of the first 16 bytes of its sha256)."""
    if isinstance(public, ec.EllipticCurvePublicKey):
        raw = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raw = _raw(public)
    return hashlib.sha256(raw).hexdigest()[:32]


def format_public_key(public: x25519.X25519PublicKey | ed25519.Ed25519PublicKey) -> str:
    """Text form of a public key: ``x25519:<base64>`` or ``ed25519:<base64>``."""
    prefix = X25519_PREFIX if isinstance(public, x25519.X25519PublicKey) else ED25519_PREFIX
    return prefix + base64.b64encode(_raw(public)).decode("ascii")


def parse_typed_public_key(text: str, prefix: str, kind: Any, *, what: str, hint: str) -> Any:
    """Parse a ``<prefix><base64>`` or PEM public key of class ``kind`` (X25519 or Ed25519)."""
    text = text.strip()
    try:
        if text.startswith(prefix):
            raw = base64.b64decode(text[len(prefix):], validate=True)
            return kind.from_public_bytes(raw)
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode("ascii"))
            if isinstance(key, kind):
                return key
    except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
        raise KeyFileError(f"{what} is malformed", hint=hint) from exc
    raise KeyFileError(f"{what} is not an {prefix.rstrip(':').capitalize()} public key", hint=hint)


def parse_public_key(text: str) -> x25519.X25519PublicKey:
    """Parse an X25519 recipient key given as ``x25519:<base64>`` or a PEM public key."""
    key: x25519.X25519PublicKey = parse_typed_public_key(
        text, X25519_PREFIX, x25519.X25519PublicKey, what="recipient public key",
        hint="use the 'x25519:...' line printed by 'edgert keys show'")
    return key


def check_private_dir(path: Path) -> None:
    """Refuse a keys directory that is not a directory, is shared, or is owned by someone else.

    A missing directory is left to the key file checks, which say how to create the keys.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise KeyFileError(f"keys directory {path} is not a directory")
    if st.st_mode & _LOOSE_BITS:
        raise KeyFileError(
            f"permissions {stat.S_IMODE(st.st_mode):04o} for {path} are too open: the keys directory "
            "must not be accessible by group or others",
            hint=f"run: chmod 700 {path}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise KeyFileError(f"keys directory {path} is owned by uid {st.st_uid}, "
                           f"not by this user ({os.geteuid()})",
                           hint="run edgert as the daemon user that owns the keys, or chown the directory")


def check_private_file(path: Path) -> None:
    """Refuse a key file that is missing, not a regular file, shared, or owned by someone else."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist",
                           hint="create the device keys with 'edgert keys init'") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"key file {path} is not a regular file")
    if st.st_mode & _LOOSE_BITS:
        raise KeyFileError(
            f"permissions {stat.S_IMODE(st.st_mode):04o} for {path} are too open: private keys must "
            "not be accessible by group or others",
            hint=f"run: chmod 600 {path}")
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise KeyFileError(f"key file {path} is owned by uid {st.st_uid}, not by this user ({os.geteuid()})",
                           hint="run edgert as the daemon user that owns the keys, or chown the file")


def load_private_key_file(path: Path) -> object:
    """Load a PKCS#8 PEM private key after the permission checks."""
    check_private_file(path)
    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"key file {path} is not a valid unencrypted PKCS#8 PEM private key",
                           hint="restore it from backup, or re-create the device keys") from exc


@dataclass(frozen=True)
class DeviceKeys:
    """The device's three private keys (loaded in memory; never printed or logged)."""

    wrap: x25519.X25519PrivateKey
    sign: ed25519.Ed25519PrivateKey
    tls: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"DeviceKeys(fingerprint={self.wrap_fingerprint})"

    @property
    def wrap_public(self) -> x25519.X25519PublicKey:
        """X25519 public key that packages are encrypted to."""
        return self.wrap.public_key()

    @property
    def sign_public(self) -> ed25519.Ed25519PublicKey:
        """Ed25519 public key that verifies audit checkpoints."""
        return self.sign.public_key()

    @functools.cached_property
    def wrap_fingerprint(self) -> str:
        """Fingerprint of the X25519 key (the device's recipient id)."""
        # Cached: deriving the public key is a scalar multiplication on every model load otherwise.
        return fingerprint(self.wrap_public)

    @classmethod
    def generate(cls) -> DeviceKeys:
        """Fresh keys (in memory only)."""
        return cls(x25519.X25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate(),
                   ec.generate_private_key(ec.SECP256R1()))

    def public_summary(self) -> dict[str, str]:
        """Public keys and fingerprints, safe to print or send to the fleet."""
        tls_pub = self.tls.public_key()
        return {
            "wrap_public_key": format_public_key(self.wrap_public),
            "wrap_fingerprint": self.wrap_fingerprint,
            "sign_public_key": format_public_key(self.sign_public),
            "sign_fingerprint": fingerprint(self.sign_public),
            "tls_public_key_pem": tls_pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii"),
            "tls_fingerprint": fingerprint(tls_pub),
        }

    def tls_csr(self, common_name: str) -> bytes:
        """A PEM certificate signing request for the TLS client key (for broker enrollment)."""
        # x509 is ~6 MB of RSS and only needed here, never on the serving path.
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        return builder.sign(self.tls, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def _pem(key: x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_keystore(keys_dir: Path, *, fs: FileSystem | None = None, exist_ok: bool = False) -> DeviceKeys:
    """Create the device keys in ``keys_dir`` (0700 dir, 0600 files) and return them.

    With ``exist_ok`` an existing complete keystore is loaded instead; otherwise existing keys are
    never overwritten (losing the wrap key makes every installed model unreadable).
    """
    fs = fs or FileSystem()
    keys_dir = Path(keys_dir)
    present = [name for name in KEY_FILES.values() if (keys_dir / name).exists()]
    if present:
        if exist_ok and len(present) == len(KEY_FILES):
            return load_keystore(keys_dir)
        raise KeyFileError(f"device keys already exist in {keys_dir} ({', '.join(sorted(present))})",
                           hint="'edgert keys show' prints them; delete the directory only to re-identify "
                                "the device (installed models become unreadable)")
    ensure_private_dir(keys_dir)
    os.chmod(keys_dir, 0o700)  # an existing (empty) directory too: the keys are about to live there
    keys = DeviceKeys.generate()
    for role, name in KEY_FILES.items():
        fs.atomic_write(keys_dir / name, [_pem(getattr(keys, role))], mode=0o600, step=f"key-{role}")
    return keys


def load_keystore(keys_dir: Path) -> DeviceKeys:
    """Load the device keys, refusing loose permissions (directory or files) or wrong key types."""
    keys_dir = Path(keys_dir)
    check_private_dir(keys_dir)
    loaded = {role: load_private_key_file(keys_dir / name) for role, name in KEY_FILES.items()}
    expected = {"wrap": x25519.X25519PrivateKey, "sign": ed25519.Ed25519PrivateKey,
                "tls": ec.EllipticCurvePrivateKey}
    for role, cls in expected.items():
        if not isinstance(loaded[role], cls):
            path = keys_dir / KEY_FILES[role]
            raise KeyFileError(f"{path} holds the wrong key type (expected {cls.__name__})",
                               hint="re-create the device keys with 'edgert keys init'")
    return DeviceKeys(loaded["wrap"], loaded["sign"], loaded["tls"])  # type: ignore[arg-type]
