"""TUF role keys of a fleet: Ed25519 signers stored as 0600 PKCS#8 PEM files named ``<role>-<keyid16>.pem``.

The file name carries the role and the start of the TUF key id, so the keys a role needs are found
from the root metadata alone. Root keys may live elsewhere (offline media): every loader takes a
list of directories to search.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner, SSlibKey
from tuf.api.metadata import Root

from edgert.errors import KeyFileError
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.keys import load_private_key_file

__all__ = [
    "KEYID_CHARS",
    "find_role_key",
    "load_role_signers",
    "new_role_signer",
    "retire_role_key",
    "role_key_name",
    "save_role_key",
]

#: Hex characters of the TUF key id kept in a key file's name.
KEYID_CHARS = 16


def new_role_signer() -> CryptoSigner:
    """A fresh Ed25519 TUF signer (in memory until :func:`save_role_key`)."""
    return CryptoSigner.generate_ed25519()


def role_key_name(role: str, keyid: str) -> str:
    """``<role>-<keyid16>.pem``."""
    return f"{role}-{keyid[:KEYID_CHARS]}.pem"


def save_role_key(keys_dir: Path, role: str, signer: CryptoSigner, *, fs: FileSystem | None = None) -> Path:
    """Write ``signer``'s private key as ``keys_dir/<role>-<keyid16>.pem`` (0600, 0700 dir)."""
    ensure_private_dir(keys_dir)
    path = Path(keys_dir) / role_key_name(role, signer.public_key.keyid)
    if path.exists():
        raise KeyFileError(f"{path} already exists", hint="a key file is never overwritten")
    (fs or FileSystem()).atomic_write(path, [signer.private_bytes], mode=0o600, step=f"tuf-{role}-key")
    return path


def find_role_key(dirs: Iterable[Path], role: str, keyid: str) -> Path | None:
    """The first ``<role>-<keyid16>.pem`` found in ``dirs``, or None."""
    for d in dirs:
        p = Path(d) / role_key_name(role, keyid)
        if p.is_file():
            return p
    return None


def load_role_signers(
    root: Root, role: str, dirs: Iterable[Path], *, required: int | None = None
) -> list[CryptoSigner]:
    """Signers for ``role``'s keys listed in ``root`` found in ``dirs``; KeyFileError below ``required``.

    ``required`` defaults to the role's threshold in ``root``.
    """
    dirs = [Path(d) for d in dirs]
    spec = root.roles[role]
    need = spec.threshold if required is None else required
    signers = []
    for keyid in spec.keyids:
        path = find_role_key(dirs, role, keyid)
        if path is None:
            continue
        private = load_private_key_file(path)
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise KeyFileError(f"{path} is not an Ed25519 private key")
        public = root.keys[keyid]
        if not isinstance(public, SSlibKey):  # pragma: no cover - only SSlibKey is ever written
            raise KeyFileError(f"{role} key {keyid[:KEYID_CHARS]} has an unsupported type")
        try:
            signers.append(CryptoSigner(private, public))
        except Exception:
            raise KeyFileError(
                f"{path} does not hold the {role} key {keyid[:KEYID_CHARS]} its name says",
                hint="restore the right key file from backup",
            ) from None
    if len(signers) < need:
        where = ", ".join(str(d) for d in dirs)
        raise KeyFileError(
            f"{len(signers)} of the {need} {role} key(s) needed were found (looked in {where})",
            hint=(
                "bring the offline root keys back and pass --root-keys DIR"
                if role == "root"
                else "restore the key files from backup"
            ),
        )
    return signers


def retire_role_key(dirs: Iterable[Path], role: str, keyid: str, *, fs: FileSystem | None = None) -> bool:
    """Delete a rotated-out key file (it signs nothing any more; a leaked copy must be useless)."""
    path = find_role_key(dirs, role, keyid)
    if path is None:
        return False
    (fs or FileSystem()).remove(path, step=f"retire-{role}")
    return not os.path.exists(path)
