"""The .edgepkg format: manifest, binding, and the attacks listed in the issue."""

from __future__ import annotations

import io
import json
import struct

import pytest

from edgert.errors import EdgertError, IntegrityError, KeyFileError, ModelError, SecurityError, SignatureError
from edgert.security import envelope
from edgert.security.keys import DeviceKeys
from edgert.security.package import (
    MAGIC,
    canonical_json,
    compare_versions,
    create_package,
    decrypt_payload,
    parse_version,
    read_header,
    verify_package,
)
from tests.security.kit import IO_DESC, NOW, PUBLISHER, SMALL_ONNX, make_package, source


def _open(data: bytes, keys: DeviceKeys, variant: int = 0, *, signature: bool = True) -> bytes:
    f = io.BytesIO(data)
    header = read_header(f)
    if signature:
        header.verify_signature()
    v = header.manifest.variants[variant]
    key = header.key_for(keys.wrap)
    verify_package(f, header, key)
    f.seek(header.payload_offset + v.payload_offset)
    out = bytearray(v.plaintext_size)
    decrypt_payload(f, header, key, variant=v, out=out, check_hashes=True)
    return bytes(out)


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12:12 + n]), data[12 + n:]


def _join(doc: dict, payload: bytes) -> bytes:
    body = canonical_json(doc)
    return MAGIC + struct.pack(">I", len(body)) + body + payload


def test_round_trip_and_manifest(device_keys: DeviceKeys) -> None:
    data = make_package(SMALL_ONNX, [device_keys], version="1.2")
    header = read_header(io.BytesIO(data))
    m = header.manifest
    assert (m.name, m.version, m.format, m.variant_names) == ("digits", "1.2", "onnx", ["int8"])
    assert m.created == "2025-01-02T03:04:05Z" and m.variants[0].inputs == IO_DESC[0]
    assert header.recipients[0]["suite"] == envelope.SUITE_HPKE
    assert _open(data, device_keys) == SMALL_ONNX.read_bytes()


def test_many_recipients_and_fallback_suite(device_keys: DeviceKeys) -> None:
    other = DeviceKeys.generate()
    data = make_package(SMALL_ONNX, [other, device_keys], suite=envelope.SUITE_FALLBACK)
    assert _open(data, device_keys) == _open(data, other) == SMALL_ONNX.read_bytes()


def test_every_byte_flip_is_refused(device_keys: DeviceKeys) -> None:
    data = make_package(SMALL_ONNX, [device_keys], chunk_size=1024)
    header_end = read_header(io.BytesIO(data)).payload_offset
    positions = list(range(0, header_end)) + list(range(header_end, len(data), 97)) + [len(data) - 1]
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(EdgertError) as exc:
            _open(bytes(bad), device_keys)
        # Structure-breaking flips are opaque IntegrityErrors; a flip in the manifest version field
        # or a recipient fingerprint may instead be reported as such (still a refusal).
        assert isinstance(exc.value, (SecurityError, ModelError)), pos


def test_truncated_package_is_refused(device_keys: DeviceKeys) -> None:
    data = make_package(SMALL_ONNX, [device_keys], chunk_size=1024)
    for cut in (5, 20, len(data) // 2, len(data) - 1024 - 16, len(data) - 1):
        with pytest.raises(IntegrityError):
            _open(data[:cut], device_keys)


def test_chunks_swapped_or_reordered_are_refused(device_keys: DeviceKeys) -> None:
    data = make_package(SMALL_ONNX, [device_keys], chunk_size=1024)
    doc, payload = _split(data)
    step = 1024 + envelope.TAG_SIZE
    chunks = [payload[i:i + step] for i in range(0, len(payload), step)]
    reordered = [chunks[1], chunks[0], *chunks[2:]]
    with pytest.raises(IntegrityError):
        _open(_join(doc, b"".join(reordered)), device_keys)
    _other_doc, other_payload = _split(make_package(SMALL_ONNX, [device_keys], chunk_size=1024))
    mixed = b"".join([*chunks[:2], other_payload[2 * step:3 * step], *chunks[3:]])
    with pytest.raises(IntegrityError):
        _open(_join(doc, mixed), device_keys)


def test_payload_spliced_into_another_manifest_is_refused(device_keys: DeviceKeys) -> None:
    doc_a, _payload_a = _split(make_package(SMALL_ONNX, [device_keys], name="a", version="1"))
    doc_b, payload_b = _split(make_package(SMALL_ONNX, [device_keys], name="a", version="2"))
    # Even with the payload hash in A's manifest updated to match B's payload, the AEAD and the
    # wrapped key are bound to the manifest, so the result does not decrypt.
    doc_a["manifest"]["variants"][0]["payload"] = doc_b["manifest"]["variants"][0]["payload"]
    with pytest.raises(SignatureError, match="bad signature"):  # the origin signature catches it first
        _open(_join(doc_a, payload_b), device_keys)
    with pytest.raises(IntegrityError):  # and without it, the encryption binding still does
        _open(_join(doc_a, payload_b), device_keys, signature=False)
    doc_a["recipients"] = doc_b["recipients"]
    with pytest.raises(IntegrityError):
        _open(_join(doc_a, payload_b), device_keys, signature=False)


def test_package_for_another_device_is_refused(device_keys: DeviceKeys) -> None:
    data = make_package(SMALL_ONNX, [DeviceKeys.generate()])
    with pytest.raises(KeyFileError, match="not encrypted for this device") as exc:
        _open(data, device_keys)
    assert "PRIVATE" not in str(exc.value)


def test_unknown_manifest_version_is_refused_clearly(device_keys: DeviceKeys) -> None:
    doc, payload = _split(make_package(SMALL_ONNX, [device_keys]))
    doc["manifest"]["manifest_version"] = 3
    with pytest.raises(ModelError, match="manifest version 3 is not supported") as exc:
        _open(_join(doc, payload), device_keys)
    assert exc.value.hint and "upgrade edgert" in exc.value.hint


def test_min_edgert_is_enforced(device_keys: DeviceKeys) -> None:
    out = io.BytesIO()
    m = create_package([source(SMALL_ONNX)], out, name="d", version="1", min_edgert="99.0",
                       recipients=[device_keys.wrap_public], signer=PUBLISHER, now=NOW)
    with pytest.raises(ModelError, match=r"needs edgert >= 99\.0"):
        m.check_compatible("0.1.0")


def test_version_ordering() -> None:
    assert compare_versions("1.10", "1.9") == 1
    assert compare_versions("2", "2.0.0") == 0
    assert compare_versions("1", "1.0.1") == -1
    for bad in ("", "v1", "1.x", "-1", "1..2", "1.2.3.4.5"):
        with pytest.raises(ModelError, match="invalid model version"):
            parse_version(bad)


def test_bad_inputs_to_create(device_keys: DeviceKeys) -> None:
    def create(sources: list, recipients: list, name: str = "d") -> None:
        create_package(sources, io.BytesIO(), name=name, version="1", recipients=recipients,
                       signer=PUBLISHER, now=NOW)

    with pytest.raises(KeyFileError, match="at least one recipient"):
        create([source(SMALL_ONNX)], [])
    with pytest.raises(ModelError, match="unknown variant"):
        create([source(SMALL_ONNX, "int4")], [device_keys.wrap_public])
    with pytest.raises(ModelError, match="invalid model name"):
        create([source(SMALL_ONNX)], [device_keys.wrap_public], name="../etc")
    with pytest.raises(ModelError, match="variant 'int8' is given twice") as exc:
        create([source(SMALL_ONNX), source(SMALL_ONNX)], [device_keys.wrap_public])
    assert exc.value.hint and "int8-tflite" in exc.value.hint
    with pytest.raises(ModelError, match="1 to 8 variants"):
        create([], [device_keys.wrap_public])


@pytest.mark.parametrize("field", ["sig", "nonce_prefix"])
def test_a_second_spelling_of_a_base64_field_is_refused(device_keys: DeviceKeys, field: str) -> None:
    """The last base64 character has unused low bits: 'Aw==' and 'Ax==' decode to the same byte. A package
    must have one byte form (the every-byte-flip test failed now and then when a flip hit those bits)."""
    import base64

    data = make_package(SMALL_ONNX, [device_keys], chunk_size=1024)
    doc, payload = _split(data)
    holder = doc["signature"] if field == "sig" else doc["manifest"]["variants"][0]
    text = holder[field]
    stripped = text.rstrip("=")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = stripped[:-1] + alphabet[alphabet.index(stripped[-1]) ^ 1] + text[len(stripped):]
    assert twin != text and base64.b64decode(twin) == base64.b64decode(text)  # same bytes, new spelling
    holder[field] = twin
    with pytest.raises((SecurityError, ModelError)):
        _open(_join(doc, payload), device_keys)


def test_canonical_json_is_the_documented_spelling(device_keys: DeviceKeys) -> None:
    # canonical_json reuses one encoder (issue 10); the bytes must stay exactly json.dumps' canonical form.
    data = make_package(SMALL_ONNX, [device_keys])
    (n,) = struct.unpack(">I", data[len(MAGIC): len(MAGIC) + 4])
    header = json.loads(data[len(MAGIC) + 4: len(MAGIC) + 4 + n])
    tricky = {"b": [1, {"z": None, "y": True}], "a": "\u00e9\u2028\x00\U0001f600", "c": {"x": "\"\\"}}
    for obj in (header, tricky, [tricky, header], {}, "s", 3):
        assert canonical_json(obj) == json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                                 ensure_ascii=False).encode("utf-8")
    assert canonical_json(header) == data[len(MAGIC) + 4: len(MAGIC) + 4 + n]
