"""Envelope encryption: a random key per payload, streamed AES-256-GCM chunks, wrapped keys.

Chunk nonces follow the STREAM construction (Hoang et al. 2015): ``prefix(7) || counter(4, BE)
|| last(1)``. The counter stops reordering and dropping chunks, the last-chunk flag stops
truncation at a chunk boundary, and the random per-payload key and prefix stop chunks being moved
between payloads. Every chunk also carries the caller's associated data (the manifest binding).

The payload key is wrapped to each recipient's X25519 public key with HPKE (RFC 9180) from
``cryptography`` when available, otherwise X25519 + HKDF-SHA256 + AES-256-GCM. Each wrapped-key
record names its suite, so a fleet can move to another (e.g. hybrid post-quantum) later.
Every decryption or unwrap failure raises the same opaque :class:`IntegrityError`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgert.errors import IntegrityError, SecurityError
from edgert.security.keys import fingerprint

__all__ = [
    "CHUNK_SIZE",
    "INTEGRITY_MESSAGE",
    "NONCE_PREFIX_SIZE",
    "SUITE_FALLBACK",
    "SUITE_HPKE",
    "TAG_SIZE",
    "available_suites",
    "ciphertext_size",
    "decrypt_stream",
    "default_suite",
    "encrypt_stream",
    "new_key",
    "new_nonce_prefix",
    "unwrap_key",
    "wrap_key",
]

KEY_SIZE = 32
TAG_SIZE = 16
NONCE_PREFIX_SIZE = 7
#: Plaintext bytes per chunk: large enough for ~GB/s AES-GCM, small enough to bound memory.
CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20
SUITE_HPKE = "HPKE-X25519-HKDF_SHA256-AES_256_GCM"
SUITE_FALLBACK = "X25519-HKDF_SHA256-AES_256_GCM"
INTEGRITY_MESSAGE = "integrity check failed: the data is corrupt, tampered with, or not encrypted to this key"
_WRAP_LABEL = b"edgert-wrap-v1"

Reader = BinaryIO


def _fail() -> IntegrityError:
    return IntegrityError(INTEGRITY_MESSAGE)


def new_key() -> bytes:
    """A fresh random 256-bit payload key."""
    return AESGCM.generate_key(bit_length=256)


def new_nonce_prefix() -> bytes:
    """A fresh random STREAM nonce prefix."""
    return os.urandom(NONCE_PREFIX_SIZE)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter >= 1 << 32:
        raise SecurityError("payload too large for one stream (2^32 chunks)")
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def ciphertext_size(plaintext_size: int, chunk_size: int = CHUNK_SIZE) -> int:
    """Size of the encrypted stream for a plaintext of ``plaintext_size`` bytes."""
    chunks = max(1, -(-plaintext_size // chunk_size))
    return plaintext_size + chunks * TAG_SIZE


def _read_full(reader: Reader, buf: bytearray) -> int:
    """Fill ``buf`` from ``reader`` as far as possible; return the bytes read."""
    view = memoryview(buf)
    total = 0
    while total < len(buf):
        n = reader.readinto(view[total:])  # type: ignore[attr-defined]
        if not n:
            break
        total += n
    return total


def encrypt_stream(key: bytes, prefix: bytes, reader: Reader, aad: bytes,
                   chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the encrypted chunks of everything ``reader`` holds (one chunk in memory at a time)."""
    aead = AESGCM(key)
    # Two read buffers, reused: encrypt() returns a new object, so a buffer is free once it has run.
    current, nxt = bytearray(chunk_size), bytearray(chunk_size)
    n_current = _read_full(reader, current)
    counter = 0
    while True:
        n_next = _read_full(reader, nxt) if n_current == chunk_size else 0
        last = n_next == 0
        yield aead.encrypt(_nonce(prefix, counter, last), memoryview(current)[:n_current], aad)
        if last:
            return
        current, nxt, n_current = nxt, current, n_next
        counter += 1


def decrypt_stream(key: bytes | AESGCM, prefix: bytes, reader: Reader | memoryview, aad: bytes, *,
                   plaintext_size: int,
                   chunk_size: int = CHUNK_SIZE, out: bytearray | memoryview | None = None,
                   on_ciphertext: Callable[[memoryview], None] | None = None,
                   on_plaintext: Callable[[memoryview], None] | None = None) -> None:
    """Decrypt a stream of exactly ``plaintext_size`` bytes into ``out`` (or only verify it).

    ``out`` (any writable buffer) must be ``plaintext_size`` long; with ``out=None`` chunks are
    decrypted into one reusable scratch buffer and discarded, so verification costs O(chunk)
    memory. Each chunk's ciphertext is passed to ``on_ciphertext`` and each verified plaintext chunk to
    ``on_plaintext`` (e.g. to hash them on the way). ``reader`` may also be a memoryview of the
    whole ciphertext (an mmap of the package), which saves copying it chunk by chunk. ``key`` may be an
    ``AESGCM`` already made from the key (it keeps no state between calls, so one may be reused).
    """
    if not 0 < chunk_size <= MAX_CHUNK_SIZE or plaintext_size < 0:
        raise _fail()
    if out is not None and len(out) != plaintext_size:
        raise ValueError("output buffer size does not match plaintext_size")
    try:
        aead = key if isinstance(key, AESGCM) else AESGCM(key)
    except ValueError:
        raise _fail() from None
    n_chunks = max(1, -(-plaintext_size // chunk_size))
    if isinstance(reader, memoryview):
        _decrypt_view(aead, prefix, reader, aad, plaintext_size, chunk_size, out, on_ciphertext, on_plaintext)
        return
    # Size the scratch buffers to the payload: a 1 MiB zero-fill per small model shows on cold load.
    largest = min(chunk_size, plaintext_size)
    cbuf = bytearray(largest + TAG_SIZE)
    scratch = bytearray(largest) if out is None else None
    out_view = memoryview(out) if out is not None else None
    for counter in range(n_chunks):
        last = counter == n_chunks - 1
        plain_len = plaintext_size - counter * chunk_size if last else chunk_size
        want = plain_len + TAG_SIZE
        got = _read_full(reader, memoryview(cbuf)[:want])  # type: ignore[arg-type]
        if got != want:
            raise _fail()
        chunk = memoryview(cbuf)[:want]
        if on_ciphertext is not None:
            on_ciphertext(chunk)
        if out_view is not None:
            target = out_view[counter * chunk_size: counter * chunk_size + plain_len]
        else:
            assert scratch is not None
            target = memoryview(scratch)[:plain_len]
        try:
            aead.decrypt_into(_nonce(prefix, counter, last), chunk, aad, target)
        except (InvalidTag, ValueError):
            raise _fail() from None
        if on_plaintext is not None:
            on_plaintext(target)
    if reader.read(1):
        raise _fail()


def _decrypt_view(aead: AESGCM, prefix: bytes, data: memoryview, aad: bytes, plaintext_size: int,
                  chunk_size: int, out: bytearray | memoryview | None,
                  on_ciphertext: Callable[[memoryview], None] | None,
                  on_plaintext: Callable[[memoryview], None] | None) -> None:
    """:func:`decrypt_stream` over ciphertext already in memory (e.g. an mmap): no read copies."""
    n_chunks = max(1, -(-plaintext_size // chunk_size))
    if len(data) != ciphertext_size(plaintext_size, chunk_size):
        raise _fail()
    out_view = memoryview(out) if out is not None else None
    scratch = memoryview(bytearray(min(chunk_size, plaintext_size))) if out is None else None
    for counter in range(n_chunks):
        last = counter == n_chunks - 1
        plain_len = plaintext_size - counter * chunk_size if last else chunk_size
        start = counter * (chunk_size + TAG_SIZE)
        if out_view is not None:
            target = out_view[counter * chunk_size: counter * chunk_size + plain_len]
        else:
            assert scratch is not None
            target = scratch[:plain_len]
        # Release the slice even when failing: a live export would stop the caller closing its mmap.
        with data[start: start + plain_len + TAG_SIZE] as chunk:
            if on_ciphertext is not None:
                on_ciphertext(chunk)
            try:
                aead.decrypt_into(_nonce(prefix, counter, last), chunk, aad, target)
            except (InvalidTag, ValueError):
                raise _fail() from None
        if on_plaintext is not None:
            on_plaintext(target)


# ---- key wrapping -----------------------------------------------------------------------------

@functools.cache
def _hpke_suite() -> object | None:
    # Cached: the import and the Suite object were rebuilt on every key unwrap (a model load).
    try:
        from cryptography.hazmat.primitives import hpke
    except ImportError:
        return None
    return hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def available_suites() -> list[str]:
    """Key wrapping suites this installation can use, preferred first."""
    return ([SUITE_HPKE] if _hpke_suite() is not None else []) + [SUITE_FALLBACK]


def default_suite() -> str:
    """The suite new packages use: HPKE when the installed cryptography has it."""
    return available_suites()[0]


def _fallback_kek(shared: bytes, eph_pub: bytes, rcpt_pub: bytes, context: bytes) -> AESGCM:
    kdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None,
               info=_WRAP_LABEL + eph_pub + rcpt_pub + context)
    return AESGCM(kdf.derive(shared))


def _raw_pub(key: x25519.X25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def wrap_key(key: bytes, recipient: x25519.X25519PublicKey, context: bytes,
             suite: str | None = None) -> dict[str, str]:
    """Wrap ``key`` to ``recipient``; ``context`` (the manifest binding) must match on unwrap."""
    suite = suite or default_suite()
    if suite == SUITE_HPKE:
        hpke_suite = _hpke_suite()
        if hpke_suite is None:
            raise SecurityError("HPKE is not available in the installed cryptography package",
                                hint="upgrade cryptography to >= 48 or use the fallback suite")
        blob = hpke_suite.encrypt(key, recipient, info=_WRAP_LABEL + context)  # type: ignore[attr-defined]
    elif suite == SUITE_FALLBACK:
        eph = x25519.X25519PrivateKey.generate()
        eph_pub = _raw_pub(eph.public_key())
        kek = _fallback_kek(eph.exchange(recipient), eph_pub, _raw_pub(recipient), context)
        blob = eph_pub + kek.encrypt(b"\0" * 12, key, context)
    else:
        raise SecurityError(f"unknown key wrapping suite {suite!r}", hint=f"use one of {available_suites()}")
    return {"recipient": fingerprint(recipient), "suite": suite,
            "wrapped": base64.b64encode(blob).decode("ascii")}


def b64decode_canonical(text: str) -> bytes:
    """Decode base64 and refuse any other spelling of the same bytes (the unused low bits of the last
    character, missing padding): a signed or bound field must have exactly one byte form."""
    blob = base64.b64decode(text, validate=True)
    if base64.b64encode(blob).decode("ascii") != text:
        raise ValueError("non-canonical base64")
    return blob


def unwrap_key(record: dict[str, str], private: x25519.X25519PrivateKey, context: bytes) -> bytes:
    """Recover the payload key from one wrapped-key record (opaque failure on any mismatch)."""
    suite = record.get("suite")
    if suite not in (SUITE_HPKE, SUITE_FALLBACK):
        raise SecurityError(f"package uses key wrapping suite {suite!r}, which this edgert does not support",
                            hint="upgrade edgert on this device")
    try:
        text = str(record.get("wrapped", ""))
        blob = b64decode_canonical(text)
        if suite == SUITE_HPKE:
            hpke_suite = _hpke_suite()
            if hpke_suite is None:
                raise SecurityError("package key is wrapped with HPKE, which this cryptography lacks",
                                    hint="upgrade cryptography to >= 48")
            key = hpke_suite.decrypt(blob, private, info=_WRAP_LABEL + context)  # type: ignore[attr-defined]
        else:
            eph_pub, sealed = blob[:32], blob[32:]
            shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(eph_pub))
            key = _fallback_kek(shared, eph_pub, _raw_pub(private.public_key()), context).decrypt(
                b"\0" * 12, sealed, context)
    except SecurityError:
        raise
    except (InvalidTag, ValueError, binascii.Error, TypeError):
        raise _fail() from None
    except Exception:  # the HPKE binding raises its own exception types; never leak them
        raise _fail() from None
    if len(key) != KEY_SIZE:
        raise _fail()
    return bytes(key)
