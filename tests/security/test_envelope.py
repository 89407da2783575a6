"""Streamed AES-GCM chunks and key wrapping: round trips and every tampering the issue lists."""

from __future__ import annotations

import io

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519
from hypothesis import given, settings
from hypothesis import strategies as st

from edgert.errors import IntegrityError, SecurityError
from edgert.security import envelope as env

CHUNK = 64


def _encrypt(data: bytes, key: bytes, prefix: bytes, aad: bytes = b"aad") -> bytes:
    return b"".join(env.encrypt_stream(key, prefix, io.BytesIO(data), aad, CHUNK))


def _decrypt(ct: bytes, key: bytes, prefix: bytes, size: int, aad: bytes = b"aad") -> bytes:
    out = bytearray(size)
    env.decrypt_stream(key, prefix, io.BytesIO(ct), aad, plaintext_size=size, chunk_size=CHUNK, out=out)
    return bytes(out)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * CHUNK + 3))
def test_round_trip_any_size(data: bytes) -> None:
    key, prefix = env.new_key(), env.new_nonce_prefix()
    ct = _encrypt(data, key, prefix)
    assert len(ct) == env.ciphertext_size(len(data), CHUNK)
    assert _decrypt(ct, key, prefix, len(data)) == data


def _chunks(ct: bytes) -> list[bytes]:
    step = CHUNK + env.TAG_SIZE
    return [ct[i:i + step] for i in range(0, len(ct), step)]


@pytest.fixture
def sample() -> tuple[bytes, bytes, bytes, bytes]:
    key, prefix = env.new_key(), env.new_nonce_prefix()
    data = bytes(range(256)) * 2  # 8 chunks of 64
    return data, key, prefix, _encrypt(data, key, prefix)


def test_every_bit_flip_is_detected(sample: tuple[bytes, bytes, bytes, bytes]) -> None:
    data, key, prefix, ct = sample
    for pos in range(len(ct)):
        for bit in (0, 7):
            bad = bytearray(ct)
            bad[pos] ^= 1 << bit
            with pytest.raises(IntegrityError):
                _decrypt(bytes(bad), key, prefix, len(data))


def test_truncation_at_chunk_boundary_is_detected(sample: tuple[bytes, bytes, bytes, bytes]) -> None:
    data, key, prefix, ct = sample
    chunks = _chunks(ct)
    short = b"".join(chunks[:-1])
    # Even when the caller is told the shorter size, the missing last-chunk flag gives it away.
    with pytest.raises(IntegrityError):
        _decrypt(short, key, prefix, len(data) - CHUNK)
    with pytest.raises(IntegrityError):
        _decrypt(short, key, prefix, len(data))
    with pytest.raises(IntegrityError):
        _decrypt(ct + b"x", key, prefix, len(data))


def test_reordered_and_swapped_chunks_are_detected(sample: tuple[bytes, bytes, bytes, bytes]) -> None:
    data, key, prefix, ct = sample
    chunks = _chunks(ct)
    reordered = [chunks[1], chunks[0], *chunks[2:]]
    with pytest.raises(IntegrityError):
        _decrypt(b"".join(reordered), key, prefix, len(data))
    # A chunk from another payload (even under the same key, with another nonce prefix) fails.
    other = _chunks(_encrypt(data, key, env.new_nonce_prefix()))
    with pytest.raises(IntegrityError):
        _decrypt(b"".join([*chunks[:3], other[3], *chunks[4:]]), key, prefix, len(data))


def test_wrong_aad_or_key_fails_opaquely(sample: tuple[bytes, bytes, bytes, bytes]) -> None:
    data, key, prefix, ct = sample
    with pytest.raises(IntegrityError) as a:
        _decrypt(ct, key, prefix, len(data), aad=b"other manifest")
    with pytest.raises(IntegrityError) as b:
        _decrypt(ct, env.new_key(), prefix, len(data))
    assert str(a.value) == str(b.value) == env.INTEGRITY_MESSAGE


def test_verify_only_mode_needs_no_output_buffer(sample: tuple[bytes, bytes, bytes, bytes]) -> None:
    data, key, prefix, ct = sample
    seen: list[bytes] = []
    env.decrypt_stream(key, prefix, io.BytesIO(ct), b"aad", plaintext_size=len(data), chunk_size=CHUNK,
                       on_plaintext=lambda m: seen.append(bytes(m)))
    assert b"".join(seen) == data


@pytest.mark.parametrize("suite", env.available_suites())
def test_wrap_round_trip_and_binding(suite: str) -> None:
    device, other = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    key = env.new_key()
    record = env.wrap_key(key, device.public_key(), b"ctx", suite)
    assert record["suite"] == suite
    assert env.unwrap_key(record, device, b"ctx") == key
    with pytest.raises(IntegrityError):
        env.unwrap_key(record, other, b"ctx")
    with pytest.raises(IntegrityError):
        env.unwrap_key(record, device, b"another manifest")
    flipped = dict(record, wrapped=record["wrapped"][:10] + ("A" if record["wrapped"][10] != "A" else "B")
                   + record["wrapped"][11:])
    with pytest.raises(IntegrityError):
        env.unwrap_key(flipped, device, b"ctx")


def test_both_suites_exist_and_hpke_is_default() -> None:
    assert env.available_suites() == [env.SUITE_HPKE, env.SUITE_FALLBACK]
    assert env.default_suite() == env.SUITE_HPKE


def test_unknown_suite_is_refused_clearly() -> None:
    device = x25519.X25519PrivateKey.generate()
    with pytest.raises(SecurityError, match="does not support"):
        env.unwrap_key({"suite": "MLKEM-something", "wrapped": ""}, device, b"ctx")
