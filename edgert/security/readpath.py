"""The store's read path: an installed package file's header, and one variant decrypted into memory.

:class:`PackageReader` reads package files that :class:`ModelStore <edgert.security.store.ModelStore>`
resolved (the store's state, active version and anti-rollback floor stay the store's business). A
header byte-identical to one this reader verified before is reused with its unwrapped key
(:mod:`edgert.security.headermemo`); any other header is parsed and checked in full. The payload is
read and authenticated on every load. Small packages are read whole with one read(2), large payloads
are decrypted from a read-only mmap; only ciphertext is ever read, and plaintext is only produced in
memory, into a buffer the caller allocates (:class:`ArrayBuffer` or
:class:`~edgert.security.membuf.PlaintextBuffer`), which is wiped if decryption fails.
"""

from __future__ import annotations

import io
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from edgert.errors import IntegrityError, SecurityError, StoreError
from edgert.security import package as pkg
from edgert.security.envelope import INTEGRITY_MESSAGE
from edgert.security.headermemo import HeaderMemo, VerifiedHeader
from edgert.security.keys import DeviceKeys
from edgert.security.membuf import wipe

__all__ = ["MMAP_MIN_PAYLOAD", "SMALL_PACKAGE_MAX", "ArrayBuffer", "DecryptTarget", "PackageReader",
           "select_variant"]

#: Payloads at least this large are decrypted from an mmap (below it the map costs more than it saves).
MMAP_MIN_PAYLOAD = 1 << 20
#: Packages up to this size are read whole with one read(2) (header and payload together) instead of
#: a buffered header read, a seek and a chunked payload read; a few µs each on a small model's
#: cold-load path (issue 10). Only ciphertext is read this way. Kept at most ``MMAP_MIN_PAYLOAD``.
SMALL_PACKAGE_MAX = 1 << 20


class DecryptTarget(Protocol):
    """A plaintext buffer to decrypt into: a writable :attr:`view`, wiped by :meth:`discard` on failure."""

    view: memoryview

    def discard(self) -> None:
        """Wipe after a failed decryption."""


_Target = TypeVar("_Target", bound=DecryptTarget)


class ArrayBuffer:
    """A zeroed ``bytearray`` target for :meth:`ModelStore.read_model` (the plain, portable path)."""

    def __init__(self, size: int) -> None:
        self.array = bytearray(size)
        self.view = memoryview(self.array)

    def discard(self) -> None:
        """Wipe after a failed decryption."""
        self.view.release()
        wipe(self.array)


def select_variant(manifest: pkg.Manifest, variant: str | None) -> pkg.Variant:
    """The variant ``variant`` (None: the first) of ``manifest``; StoreError naming the variants if absent."""
    spec = manifest.find(variant)
    if spec is None:
        raise StoreError(f"{manifest.name} {manifest.version} has no variant {variant!r}",
                         hint=f"its variants: {', '.join(manifest.variant_names)}")
    return spec


def _checked_header(header: pkg.PackageHeader, variant: str | None, size: int) -> pkg.Variant:
    """The variant to decrypt, once the file's size matches what its header says."""
    spec = select_variant(header.manifest, variant)
    if size != header.payload_offset + header.manifest.payload_size:
        raise IntegrityError(INTEGRITY_MESSAGE)  # truncated, or bytes appended
    return spec


class PackageReader:
    """Reads package files with the device's keys, reusing verified headers kept in ``headers``."""

    def __init__(self, keys: DeviceKeys, headers: HeaderMemo) -> None:
        self.keys = keys
        self.headers = headers

    def header(self, path: str) -> pkg.PackageHeader:
        """Parsed (not decrypted) header of the package file ``path``."""
        with open(path, "rb") as f:
            known = self.headers.prefix(path)
            if known is not None:  # the size and variants a cold load asks first: no re-parse if unchanged
                hit = self.headers.lookup(path, f.read(len(known)))
                if hit is not None:
                    return hit.header
                f.seek(0)
            return pkg.read_header(f, os.path.basename(path))

    def decrypt(self, path: str, variant: str | None,
                alloc: Callable[[int], _Target]) -> tuple[pkg.VariantManifest, _Target]:
        """Decrypt one variant of package file ``path`` into ``alloc(plaintext_size)`` (its ``.view``)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                if size <= SMALL_PACKAGE_MAX:
                    # One read(2) of the whole (encrypted) file; asking for one byte more than fstat
                    # said means a file that grew meanwhile fails the size check, as before.
                    data = os.read(fd, size + 1)
                    return self._decrypt_small(path, data, variant, alloc)
                with open(fd, "rb", closefd=False) as f:
                    return self._decrypt_file(path, f, size, variant, alloc)
            finally:
                os.close(fd)
        except OSError as exc:
            raise StoreError(f"cannot read package {path}: {exc.strerror}") from exc

    def _decrypt_small(self, path: str, data: bytes, variant: str | None,
                       alloc: Callable[[int], _Target]) -> tuple[pkg.VariantManifest, _Target]:
        """Decrypt from a whole (encrypted) package in memory; reuse its header if verified before."""
        # A header byte-identical to one this store verified parses and unwraps to the same result
        # (edgert/security/headermemo.py); any other header is parsed and checked in full.
        known = self.headers.lookup(path, data)
        if known is None:
            header = pkg.read_header(io.BytesIO(data), os.path.basename(path))
            spec = _checked_header(header, variant, len(data))
            key = header.key_for(self.keys.wrap, self.keys.wrap_fingerprint)
            verified = VerifiedHeader(data[: header.payload_offset], header, key)
        else:
            verified, header = known, known.header
            spec = _checked_header(header, variant, len(data))
        start = header.payload_offset + spec.payload_offset
        buf = alloc(spec.plaintext_size)
        try:
            with memoryview(data)[start: start + spec.payload_size] as view:
                pkg.decrypt_payload(view, header, verified.key, variant=spec, out=buf.view,
                                    derived=verified.variant_cipher(spec))
        except BaseException:
            buf.discard()
            raise
        if known is None:
            self.headers.remember(path, verified)
        return pkg.VariantManifest(header.manifest, spec), buf

    def _decrypt_file(self, path: str, f: BinaryIO, size: int, variant: str | None,
                      alloc: Callable[[int], _Target]) -> tuple[pkg.VariantManifest, _Target]:
        """Decrypt from an open package file (of ``size`` bytes) larger than ``SMALL_PACKAGE_MAX``."""
        header = pkg.read_header(f, os.path.basename(path))
        spec = _checked_header(header, variant, size)
        key = header.key_for(self.keys.wrap, self.keys.wrap_fingerprint)
        start = header.payload_offset + spec.payload_offset
        buf = alloc(spec.plaintext_size)
        try:
            if spec.payload_size >= MMAP_MIN_PAYLOAD:
                # Decrypt from a read-only map of the (encrypted) file: no read copies.
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                    view = memoryview(mapped)[start: start + spec.payload_size]
                    try:
                        pkg.decrypt_payload(view, header, key, variant=spec, out=buf.view)
                    finally:
                        view.release()
            else:
                f.seek(start)
                pkg.decrypt_payload(f, header, key, variant=spec, out=buf.view)
        except BaseException:
            buf.discard()
            raise
        return pkg.VariantManifest(header.manifest, spec), buf

    def verify(self, path: Path, header: pkg.PackageHeader) -> None:
        """Decrypt every variant of ``path`` to nowhere; it must hold exactly ``header``."""
        with open(path, "rb") as f:
            found = pkg.read_header(f, path.name)
            if found.manifest.raw != header.manifest.raw or found.signature != header.signature:
                raise SecurityError("package changed while it was being installed")
            pkg.verify_package(f, found, found.key_for(self.keys.wrap, self.keys.wrap_fingerprint))
