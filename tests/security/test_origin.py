"""Origin signing (issue 8): who may build a package this device installs."""

from __future__ import annotations

import base64
import io
import json
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.errors import IntegrityError, ModelError, SignatureError, UntrustedSignerError, exit_code_for
from edgert.security.audit import AuditLog, read_records
from edgert.security.keys import DeviceKeys, fingerprint
from edgert.security.loader import import_model
from edgert.security.package import MAGIC, canonical_json, read_header, rewrap, sign_manifest
from edgert.security.store import ModelStore
from tests.security.kit import PUBLISHER, SMALL_ONNX, make_package, source, trusted


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12:12 + n]), data[12 + n:]


def _join(doc: dict, payload: bytes) -> bytes:
    body = canonical_json(doc)
    return MAGIC + struct.pack(">I", len(body)) + body + payload


def _store(state: Path, keys: DeviceKeys, *signers: ed25519.Ed25519PrivateKey) -> tuple[ModelStore, AuditLog]:
    audit = AuditLog(state / "audit", keys.sign)
    return ModelStore(state / "models", keys, audit=audit, trusted=trusted(*signers)), audit


def _write(tmp_path: Path, data: bytes, name: str = "p.edgepkg") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _refusals(state: Path, audit: AuditLog) -> list[dict]:
    audit.close()
    return [r["data"] for r in read_records(state / "audit") if r["event"] == "package_refused"]


def _assert_nothing_installed(state: Path, store: ModelStore) -> None:
    assert store.entries() == []
    assert list((state / "models" / "packages").iterdir()) == []


def test_unsigned_package_is_refused_and_audited(state: Path, device_keys: DeviceKeys,
                                                 tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    doc, payload = _split(make_package(SMALL_ONNX, [device_keys]))
    del doc["signature"]
    with pytest.raises(SignatureError, match="digits 1 is not signed") as exc:
        store.install(_write(tmp_path, _join(doc, payload)))
    assert exc.value.hint and "--publisher-key" in exc.value.hint and exit_code_for(exc.value) == 16
    _assert_nothing_installed(state, store)
    refusal = {"model": "digits", "version": "1", "reason": "unsigned", "signer": None}
    assert _refusals(state, audit) == [refusal]


def test_bad_signature_is_refused_and_audited(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    doc, payload = _split(make_package(SMALL_ONNX, [device_keys]))
    sig = bytearray(base64.b64decode(doc["signature"]["sig"]))
    sig[5] ^= 0x01
    doc["signature"]["sig"] = base64.b64encode(bytes(sig)).decode()
    with pytest.raises(SignatureError, match="bad signature") as exc:
        store.install(_write(tmp_path, _join(doc, payload)))
    assert fingerprint(PUBLISHER.public_key()) in exc.value.message
    _assert_nothing_installed(state, store)
    assert [r["reason"] for r in _refusals(state, audit)] == ["bad_signature"]


@pytest.mark.parametrize("edit", ["min_edgert", "inputs", "plaintext_sha256", "payload_sha256", "variant"])
def test_manifest_edited_after_signing_is_refused(state: Path, device_keys: DeviceKeys, tmp_path: Path,
                                                  edit: str) -> None:
    store, audit = _store(state, device_keys)
    doc, payload = _split(make_package(SMALL_ONNX, [device_keys]))
    m, v = doc["manifest"], doc["manifest"]["variants"][0]
    if edit == "min_edgert":
        m["min_edgert"] = "0.0.1"
    elif edit == "inputs":
        v["inputs"][0]["shape"] = [None, 65]
    elif edit == "payload_sha256":
        v["payload"]["sha256"] = "0" * 64
    elif edit == "variant":
        v["variant"] = "fp32"
    else:
        v["plaintext_sha256"] = "1" * 64
    with pytest.raises(SignatureError, match="changed after signing"):
        store.install(_write(tmp_path, _join(doc, payload)))
    _assert_nothing_installed(state, store)
    assert [r["reason"] for r in _refusals(state, audit)] == ["bad_signature"]


def test_unknown_signer_is_refused_with_the_fix(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    stranger = ed25519.Ed25519PrivateKey.generate()  # holds only the device's PUBLIC key
    with pytest.raises(UntrustedSignerError) as exc:
        store.install(_write(tmp_path, make_package(SMALL_ONNX, [device_keys], signer=stranger)))
    fp = fingerprint(stranger.public_key())
    assert f"signed by publisher {fp}, which this device does not trust" in exc.value.message
    assert exc.value.hint and "edgert keys trust ed25519:" in exc.value.hint
    assert exit_code_for(exc.value) == 17
    _assert_nothing_installed(state, store)
    assert _refusals(state, audit) == [{"model": "digits", "version": "1", "reason": "untrusted_signer",
                                        "signer": fp}]


def test_package_of_another_fleet_is_refused(tmp_path: Path) -> None:
    fleet_a, fleet_b = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    device_a, device_b = DeviceKeys.generate(), DeviceKeys.generate()
    store_a = ModelStore(tmp_path / "a", device_a, trusted=trusted(fleet_a))
    store_b = ModelStore(tmp_path / "b", device_b, trusted=trusted(fleet_b))
    # Fleet B's package, wrapped for both devices: B installs it, A (which trusts only A) refuses.
    pkg = _write(tmp_path, make_package(SMALL_ONNX, [device_a, device_b], signer=fleet_b))
    assert store_b.install(pkg).version == "1"
    with pytest.raises(UntrustedSignerError, match=fingerprint(fleet_b.public_key())):
        store_a.install(pkg)
    assert store_a.entries() == []


def test_local_import_is_signed_by_the_device_and_audited_as_local(state: Path, device_keys: DeviceKeys,
                                                                   tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    def describe(path: Path) -> tuple[str, str, list, list]:
        return "onnx", "int8", source(path).inputs, source(path).outputs

    m = import_model(store, SMALL_ONNX, name="byo", version="1", describe=describe)
    header = store.header("byo")
    assert header.signer_fingerprint == fingerprint(device_keys.sign_public) and m.variant_names == ["int8"]
    # ...but another device's own key is just an unknown signer here.
    other = DeviceKeys.generate()
    with pytest.raises(UntrustedSignerError):
        store.install(_write(tmp_path, make_package(SMALL_ONNX, [device_keys], name="x", signer=other.sign)))
    audit.close()
    installs = [r["data"] for r in read_records(state / "audit") if r["event"] == "model_install"]
    assert installs[0]["origin"] == "local" and installs[0]["signer"] == fingerprint(device_keys.sign_public)


def test_rewrapping_recipients_keeps_the_signature(state: Path, device_keys: DeviceKeys,
                                                   tmp_path: Path) -> None:
    fleet_escrow = DeviceKeys.generate()  # the fleet keeps a recipient key of its own to re-wrap with
    original = make_package(SMALL_ONNX, [fleet_escrow])
    out = io.BytesIO()
    rewrap(io.BytesIO(original), out, private=fleet_escrow.wrap, recipients=[device_keys.wrap_public])
    header = read_header(io.BytesIO(out.getvalue()))
    assert header.signature == read_header(io.BytesIO(original)).signature
    assert [r["recipient"] for r in header.recipients] == [device_keys.wrap_fingerprint]
    store, audit = _store(state, device_keys)
    store.install(_write(tmp_path, out.getvalue()))
    assert bytes(store.read_model("digits")[1]) == SMALL_ONNX.read_bytes()
    audit.close()


def test_format_1_package_is_refused_clearly(device_keys: DeviceKeys) -> None:
    doc, payload = _split(make_package(SMALL_ONNX, [device_keys]))
    doc["manifest"]["manifest_version"] = 1
    with pytest.raises(ModelError) as exc:
        read_header(io.BytesIO(_join(doc, payload)))
    assert exc.value.message == ("package format 1 is no longer supported: re-create it with "
                                 "`edgert package create`")


def test_payload_moved_to_another_variant_slot_is_refused(state: Path, device_keys: DeviceKeys,
                                                          tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    data = make_package([source(SMALL_ONNX, "int8"), source(SMALL_ONNX, "fp32")], [device_keys])
    doc, payload = _split(data)
    a, b = doc["manifest"]["variants"]
    assert a["payload"]["size"] == b["payload"]["size"]  # same plaintext: the slots fit each other
    size = a["payload"]["size"]
    swapped = payload[size:] + payload[:size]
    with pytest.raises(IntegrityError):  # the signed payload hashes no longer match
        store.install(_write(tmp_path, _join(doc, swapped), "swap.edgepkg"))
    # Even a publisher that re-signs the swapped hashes gets nothing: each variant's chunks are bound
    # to its index (own derived key and associated data), so the swapped payloads do not decrypt.
    a["payload"]["sha256"], b["payload"]["sha256"] = b["payload"]["sha256"], a["payload"]["sha256"]
    with pytest.raises(SignatureError):  # edited hashes without a new signature: refused as such
        store.install(_write(tmp_path, _join(doc, swapped), "swap1.edgepkg"))
    doc["signature"] = sign_manifest(doc["manifest"], PUBLISHER)
    with pytest.raises(IntegrityError):
        store.install(_write(tmp_path, _join(doc, swapped), "swap2.edgepkg"))
    _assert_nothing_installed(state, store)
    audit.close()


def test_not_a_package_is_named_as_such(device_keys: DeviceKeys, tmp_path: Path) -> None:
    with open(SMALL_ONNX, "rb") as f, pytest.raises(ModelError) as exc:
        read_header(f, SMALL_ONNX.name)
    assert exc.value.message == f"{SMALL_ONNX.name} is not an edgert package (no EDGEPKG header)"
    damaged = bytearray(make_package(SMALL_ONNX, [device_keys]))
    damaged[20] ^= 0x40  # inside the header: a damaged package, not another kind of file
    with pytest.raises(IntegrityError):
        read_header(io.BytesIO(bytes(damaged)))
