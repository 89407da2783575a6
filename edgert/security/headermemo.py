"""Verified package headers and their unwrapped keys, reused by a store only for byte-identical headers.

Parsing a package header (JSON, the canonical re-encode check, the manifest, the manifest binding)
and unwrapping its package key (HPKE: an X25519 exchange and HKDF) cost about 0.2-0.3 ms per load;
on a model that loads in 0.4 ms that was most of the gap between an encrypted and a plaintext
load (issue 10). Both are pure functions of the header's bytes and the device key, so
:class:`ModelStore <edgert.security.store.ModelStore>` keeps their results keyed on those exact
bytes:

* a load whose file *starts with the very bytes* (magic, length, header) of a header this store
  already parsed, checked and unwrapped reuses the result, which is what parsing them again would
  return;
* any other header (changed, tampered with, re-wrapped, another version) is parsed and checked in
  full, as before, and nothing is reused;
* the payload is read and authenticated (AES-GCM under a key bound to the manifest) on every load,
  and the store's state (active version, anti-rollback floor) is read on every load.

Only headers of loads that succeeded are kept, at most :data:`HEADER_MEMO_MAX` of them (least
recently used dropped first); removing or pruning a version forgets it. Keeping package keys in
memory adds no exposure: the device's X25519 private key, which unwraps every package, is in the same
process's memory for as long as the store is open (docs/security.md, "Limits").
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgert.security import package as pkg

__all__ = ["HEADER_MEMO_MAX", "HEADER_MEMO_MAX_BYTES", "HeaderMemo", "VerifiedHeader"]

#: Verified headers a store keeps (one per package file loaded; a few KB each).
HEADER_MEMO_MAX = 64
#: Header bytes a store keeps in all (a header carrying a large reference profile may be ~1 MiB).
HEADER_MEMO_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class VerifiedHeader:
    """A header parsed and checked from ``prefix``, its unwrapped package key and the variant ciphers made."""

    prefix: bytes = field(repr=False)  # the file up to the payload: magic, length, header, exactly as read
    header: pkg.PackageHeader
    key: bytes = field(repr=False)
    ciphers: dict[int, AESGCM] = field(default_factory=dict, repr=False)

    def variant_cipher(self, spec: pkg.Variant) -> AESGCM:
        """AES-GCM under the key ``spec``'s payload is encrypted with (derived and set up once).

        ``AESGCM`` keeps no state between calls (each decryption copies a base context), so threads
        may share it.
        """
        cipher = self.ciphers.get(spec.index)
        if cipher is None:
            cipher = self.ciphers[spec.index] = AESGCM(pkg.variant_key(self.header, self.key, spec))
        return cipher


class HeaderMemo:
    """Verified headers and their keys by package file, valid only for byte-identical headers."""

    def __init__(self, max_entries: int = HEADER_MEMO_MAX, max_bytes: int = HEADER_MEMO_MAX_BYTES) -> None:
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._bytes = 0
        self._entries: OrderedDict[str, VerifiedHeader] = OrderedDict()
        self._lock = threading.Lock()
        #: Loads that reused a verified header / that found none to reuse (for tests and benchmarks).
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, path: str, data: bytes) -> VerifiedHeader | None:
        """What was verified for ``path``, if ``data`` (the file from its start) begins with those bytes."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is None or not data.startswith(entry.prefix):
                self.misses += 1
                return None
            self._entries.move_to_end(path)
            self.hits += 1
            return entry

    def prefix(self, path: str) -> bytes | None:
        """The header bytes verified for ``path`` (what :meth:`lookup` compares against), or None."""
        entry = self._entries.get(path)
        return entry.prefix if entry is not None else None

    def remember(self, path: str, entry: VerifiedHeader) -> None:
        """Keep ``entry`` for ``path`` (after a load from it succeeded), dropping the least recently used."""
        if self.max_entries == 0 or len(entry.prefix) > self.max_bytes:
            return
        with self._lock:
            self._drop(path)
            self._entries[path] = entry
            self._bytes += len(entry.prefix)
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, path: str) -> None:
        old = self._entries.pop(path, None)
        if old is not None:
            self._bytes -= len(old.prefix)

    def forget(self, path: str) -> None:
        """Drop what is kept for ``path`` (its version was removed or pruned)."""
        with self._lock:
            self._drop(path)

    def clear(self) -> None:
        """Drop everything (the next load of each package parses and unwraps its header again)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
