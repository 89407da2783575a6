"""The store reuses a verified header and its unwrapped keys only for byte-identical headers (issue 10).

Every check a load makes must still hold after a load has filled the memo: a changed header is parsed
and checked in full (canonical encoding, manifest binding, recipient), the payload is authenticated on
every load, and the file's size is checked on every load. Each tampering test asserts the error a store
with nothing memoized raises on the same file, so reuse cannot hide a refusal.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pytest

from edgert.errors import EdgertError, IntegrityError, KeyFileError
from edgert.security import envelope
from edgert.security.headermemo import HeaderMemo, VerifiedHeader
from edgert.security.keys import DeviceKeys
from edgert.security.package import MAGIC, canonical_json, read_header, rewrap, variant_key
from edgert.security.store import ModelStore
from tests.security.kit import SMALL_ONNX, SMALL_TFLITE, fleet_store, make_package, source


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", data[8:12])
    return json.loads(data[12:12 + n]), data[12 + n:]


def _frame(body: bytes, payload: bytes) -> bytes:
    return MAGIC + struct.pack(">I", len(body)) + body + payload


def _installed(state: Path, keys: DeviceKeys, tmp_path: Path, *versions: str) -> ModelStore:
    store = fleet_store(state / "models", keys)
    for v in versions or ("1",):
        pkg_file = tmp_path / f"digits-{v}.edgepkg"
        pkg_file.write_bytes(make_package(SMALL_ONNX, [keys], version=v))
        store.install(pkg_file)
    return store


def _loaded(state: Path, keys: DeviceKeys, tmp_path: Path) -> tuple[ModelStore, Path]:
    """A store that has loaded digits 1 once (its header memoized), and the stored package file."""
    store = _installed(state, keys, tmp_path)
    assert bytes(store.read_model_bytes("digits")[1]) == SMALL_ONNX.read_bytes()
    assert len(store.headers) == 1
    return store, store._package_path("digits", "1")


def _fresh_error(state: Path, keys: DeviceKeys) -> EdgertError:
    """What a store with nothing memoized raises when loading digits now."""
    with pytest.raises(EdgertError) as exc:
        fleet_store(state / "models", keys).read_model_bytes("digits")
    return exc.value


def test_repeated_loads_unwrap_the_key_once(state: Path, device_keys: DeviceKeys, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    store = _installed(state, device_keys, tmp_path)
    unwraps = []
    real = envelope.unwrap_key
    monkeypatch.setattr(envelope, "unwrap_key", lambda *a, **k: unwraps.append(1) or real(*a, **k))
    for _ in range(4):
        assert store.read_model_bytes("digits")[1] == SMALL_ONNX.read_bytes()
    assert len(unwraps) == 1
    assert (store.headers.hits, store.headers.misses) == (3, 1)


def _flip_header_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[40] ^= 0x01
    return bytes(damaged)


def _non_canonical(data: bytes) -> bytes:
    doc, payload = _split(data)
    return _frame(json.dumps(doc, sort_keys=True).encode("utf-8"), payload)  # ", " and ": ": same document


def _edited_manifest(data: bytes) -> bytes:
    doc, payload = _split(data)
    doc["manifest"]["created"] = "2030-01-01T00:00:00Z"  # the wrapped key is bound to the manifest
    return _frame(canonical_json(doc), payload)


def _other_recipient(data: bytes) -> bytes:
    doc, payload = _split(data)
    doc["recipients"][0]["recipient"] = "0" * 32
    return _frame(canonical_json(doc), payload)


@pytest.mark.parametrize(("tamper", "error"), [
    (_flip_header_byte, IntegrityError),
    (_non_canonical, IntegrityError),
    (_edited_manifest, IntegrityError),
    (_other_recipient, KeyFileError),
])
def test_a_header_changed_after_a_load_is_refused_as_without_the_memo(
        state: Path, device_keys: DeviceKeys, tmp_path: Path, tamper, error: type) -> None:
    store, path = _loaded(state, device_keys, tmp_path)
    path.write_bytes(tamper(path.read_bytes()))
    with pytest.raises(error) as exc:
        store.read_model_bytes("digits")
    fresh = _fresh_error(state, device_keys)
    assert (type(exc.value), exc.value.message) == (type(fresh), fresh.message)
    assert store.headers.hits == 0
    # What a cold load asks first (size, variants), without decrypting: the same as a fresh store's answer.
    fresh_store = fleet_store(state / "models", device_keys)
    assert _header_outcome(store) == _header_outcome(fresh_store)


def _header_outcome(store: ModelStore) -> tuple[object, ...]:
    try:
        header = store.header("digits")
    except EdgertError as exc:
        return type(exc), exc.message
    return header.manifest.raw, header.recipients, header.signature, header.payload_offset


@pytest.mark.parametrize("change", ["flip_payload", "truncate", "append"])
def test_payload_or_size_changed_after_a_load_still_fails(state: Path, device_keys: DeviceKeys,
                                                          tmp_path: Path, change: str) -> None:
    store, path = _loaded(state, device_keys, tmp_path)
    data = bytearray(path.read_bytes())
    if change == "flip_payload":
        data[-20] ^= 0x01
    elif change == "truncate":
        del data[-1:]
    else:
        data += b"x"
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.read_model_bytes("digits")
    assert store.headers.hits == 1  # the header was byte-identical: reused, and still refused
    assert isinstance(_fresh_error(state, device_keys), IntegrityError)


def test_a_failed_first_load_memoizes_nothing(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store = _installed(state, device_keys, tmp_path)
    path = store._package_path("digits", "1")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.read_model_bytes("digits")
    assert len(store.headers) == 0


def test_a_rewrapped_header_is_verified_again(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store, path = _loaded(state, device_keys, tmp_path)
    out = io.BytesIO()
    rewrap(io.BytesIO(path.read_bytes()), out, private=device_keys.wrap, recipients=[device_keys.wrap_public])
    assert out.getvalue() != path.read_bytes()  # a fresh HPKE encapsulation: other header bytes
    path.write_bytes(out.getvalue())
    assert store.read_model_bytes("digits")[1] == SMALL_ONNX.read_bytes()
    assert (store.headers.hits, store.headers.misses) == (0, 2)
    new_header = read_header(io.BytesIO(out.getvalue()))
    assert store.headers.prefix(str(path)) == out.getvalue()[: new_header.payload_offset]


def test_each_variant_decrypts_with_its_own_key(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store = fleet_store(state / "models", device_keys)
    pkg_file = tmp_path / "two.edgepkg"
    pkg_file.write_bytes(make_package([source(SMALL_ONNX, "int8"), source(SMALL_TFLITE, "int8-tflite")],
                                      [device_keys]))
    store.install(pkg_file)
    for _ in range(2):
        assert store.read_model_bytes("digits", variant="int8")[1] == SMALL_ONNX.read_bytes()
        assert store.read_model_bytes("digits", variant="int8-tflite")[1] == SMALL_TFLITE.read_bytes()
    assert (store.headers.hits, store.headers.misses) == (3, 1)


def test_removed_and_pruned_versions_are_forgotten(state: Path, device_keys: DeviceKeys,
                                                   tmp_path: Path) -> None:
    store = _installed(state, device_keys, tmp_path, "1", "2", "3", "4")
    for v in ("1", "2", "3", "4"):
        store.read_model_bytes("digits", v)
    assert len(store.headers) == 4
    assert store.prune("digits", keep=3) == ["1"]
    assert store.headers.prefix(str(store._package_path("digits", "1"))) is None
    assert len(store.headers) == 3
    store.remove("digits", force=True)
    assert len(store.headers) == 0


def test_the_memo_is_bounded_least_recently_used_first() -> None:
    memo = HeaderMemo(max_entries=2)
    header = read_header(io.BytesIO(make_package(SMALL_ONNX, [DeviceKeys.generate()])))
    for name in ("a", "b"):
        memo.remember(name, VerifiedHeader(b"x", header, bytes(32)))
    assert memo.lookup("a", b"x...") is not None  # "a" is now the most recently used
    memo.remember("c", VerifiedHeader(b"x", header, bytes(32)))
    assert (memo.prefix("a"), memo.prefix("b"), memo.prefix("c")) == (b"x", None, b"x")
    assert memo.lookup("a", b"y...") is None  # other bytes: nothing reused
    with pytest.raises(ValueError):
        HeaderMemo(max_entries=-1)


def test_the_memo_is_bounded_in_bytes() -> None:
    memo = HeaderMemo(max_bytes=10)
    header = read_header(io.BytesIO(make_package(SMALL_ONNX, [DeviceKeys.generate()])))
    for name in ("a", "b", "c"):
        memo.remember(name, VerifiedHeader(name.encode() * 4, header, bytes(32)))
    assert (memo.prefix("a"), memo.prefix("b"), memo.prefix("c")) == (None, b"bbbb", b"cccc")
    memo.remember("b", VerifiedHeader(b"B" * 6, header, bytes(32)))  # replaced: its old bytes are freed
    assert (memo.prefix("b"), memo.prefix("c")) == (b"B" * 6, b"cccc")
    memo.remember("d", VerifiedHeader(b"d" * 11, header, bytes(32)))  # larger than the whole budget: not kept
    assert (len(memo), memo.prefix("d")) == (2, None)
    memo.forget("b")
    memo.remember("e", VerifiedHeader(b"e" * 6, header, bytes(32)))
    assert (memo.prefix("c"), memo.prefix("e")) == (b"cccc", b"e" * 6)


def test_keys_never_show_in_a_repr(device_keys: DeviceKeys) -> None:
    header = read_header(io.BytesIO(make_package(SMALL_ONNX, [device_keys])))
    key = header.key_for(device_keys.wrap)
    entry = VerifiedHeader(b"prefix", header, key)
    spec = header.manifest.variants[0]
    text = repr(entry)
    entry.variant_cipher(spec)
    for secret in (key, variant_key(header, key, spec)):
        assert secret.hex() not in text and repr(secret) not in text


def test_header_of_an_unchanged_loaded_package_is_reused(state: Path, device_keys: DeviceKeys,
                                                         tmp_path: Path) -> None:
    store, _ = _loaded(state, device_keys, tmp_path)
    assert _header_outcome(store) == _header_outcome(fleet_store(state / "models", device_keys))
    assert store.headers.hits == 1


def test_threads_share_what_is_reused(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    store = _installed(state, device_keys, tmp_path)
    expected = SMALL_ONNX.read_bytes()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: store.read_model_bytes("digits")[1] == expected, range(64)))
    assert all(results)
    assert store.headers.hits + store.headers.misses == 64 and len(store.headers) == 1
