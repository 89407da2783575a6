"""Decrypting straight into one bytes object: contents, wiping, and never wiping a buffer in use."""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest

from edgert.device.importing import import_plaintext
from edgert.security import loader, membuf
from edgert.security.loader import load_from_store, open_keystore, open_store
from tests.security.kit import MODELS, SMALL_ONNX, SMALL_TFLITE


def test_plaintext_buffer_fills_one_bytes_object() -> None:
    buf = membuf.PlaintextBuffer(4096)
    buf.view[:] = bytes(range(256)) * 16
    out = buf.take()
    assert type(out) is bytes and out == bytes(range(256)) * 16
    with pytest.raises(ValueError):  # the writable view is gone once the bytes are handed out
        buf.view[0] = 1
    membuf.wipe(out)
    assert out == bytes(4096)


@pytest.mark.parametrize("size", [0, 1, 2])
def test_tiny_buffers_never_write_into_shared_objects(size: int) -> None:
    buf = membuf.PlaintextBuffer(size)
    buf.view[:] = b"\x07" * size
    assert buf.take() == b"\x07" * size
    assert b"" == bytes(0) and bytes([7]) == b"\x07"  # interned singletons untouched


def test_wipe_bytearray() -> None:
    data = bytearray(b"secret" * 100)
    membuf.wipe(data)
    assert data == bytearray(600)


def test_read_model_bytes_matches_source(state: Path) -> None:
    keys = open_keystore(state)
    import_plaintext(open_store(state, keys), SMALL_ONNX)
    store = open_store(state, keys)
    _manifest, data = store.read_model_bytes("digits_small_int8")
    assert type(data) is bytes and data == SMALL_ONNX.read_bytes()
    assert bytes(store.read_model("digits_small_int8")[1]) == data


@pytest.mark.parametrize("model_file", [SMALL_ONNX, SMALL_TFLITE])
def test_load_from_store_wipes_only_after_the_backend_lets_go(
    state: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgert import Runtime

    keys = open_keystore(state)
    import_plaintext(open_store(state, keys), model_file)
    name = "digits_small_int8"
    wiped: list[bytes] = []
    real_wipe = membuf.wipe

    def spy(data: bytes) -> None:
        wiped.append(data)
        real_wipe(data)

    monkeypatch.setattr(loader, "wipe", spy)
    model = load_from_store(Runtime(profile="cpu-generic"), open_store(state, keys), name)
    x = np.load(MODELS / "digits_test.npz")["x"][:8]
    before = model.infer({"pixels": x})
    assert wiped == []  # both backends keep the buffer while the model lives: it must stay intact
    gc.collect()
    again = model.infer({"pixels": x})
    for k in before:
        np.testing.assert_array_equal(before[k], again[k])
    model.close()
    del model
    gc.collect()
    assert len(wiped) == 1 and wiped[0] == bytes(len(wiped[0])) and len(wiped[0]) == model_file.stat().st_size


class _Model:
    """Stands in for a loaded model (weak-referenceable)."""


@pytest.mark.parametrize("backend_keeps_it", [False, True])
def test_wipe_at_load_depends_on_whether_the_backend_keeps_the_buffer(
    state: Path, monkeypatch: pytest.MonkeyPatch, backend_keeps_it: bool
) -> None:
    keys = open_keystore(state)
    import_plaintext(open_store(state, keys), SMALL_ONNX)
    kept: list[bytes] = []
    copies: list[bytes] = []
    wiped: list[int] = []
    monkeypatch.setattr(loader, "wipe", lambda data: wiped.append(len(data)))

    class FakeRuntime:
        def load(self, data: bytes, **_: object) -> _Model:
            copies.append(bytes(bytearray(data)))  # what a backend that parses and copies would do
            if backend_keeps_it:
                kept.append(data)
            return _Model()

    model = load_from_store(FakeRuntime(), open_store(state, keys), "digits_small_int8")
    assert copies == [SMALL_ONNX.read_bytes()]
    if backend_keeps_it:
        assert wiped == [] and kept[0] == SMALL_ONNX.read_bytes()
        del model
        gc.collect()
        assert wiped == []  # still referenced by the "backend": never wiped under it
    else:
        assert wiped == [SMALL_ONNX.stat().st_size]


def test_large_payloads_decrypt_from_a_map_and_tampering_is_caught(state: Path) -> None:
    from edgert.errors import IntegrityError
    from edgert.security.package import read_header
    from edgert.security.store import MMAP_MIN_PAYLOAD

    source = MODELS / "mobilenetv2_int8.onnx"
    assert source.stat().st_size > MMAP_MIN_PAYLOAD  # this test is about the mmap path
    keys = open_keystore(state)
    import_plaintext(open_store(state, keys), source)
    store = open_store(state, keys)
    _manifest, data = store.read_model_bytes("mobilenetv2_int8")
    assert data == source.read_bytes()
    package = state / "models" / "packages" / "mobilenetv2_int8" / "1.edgepkg"
    original = package.read_bytes()
    with open(package, "rb") as f:
        offset = read_header(f).payload_offset
    at = offset + 3 * 1024 * 1024 + 5  # in the fourth chunk
    flipped = original[:at] + bytes([original[at] ^ 1]) + original[at + 1:]
    for damaged in (flipped, original[:-1], original + b"\0"):  # flipped bit, truncated, trailing bytes
        package.write_bytes(damaged)
        with pytest.raises(IntegrityError):
            store.read_model_bytes("mobilenetv2_int8")
    package.write_bytes(original)
    assert store.read_model_bytes("mobilenetv2_int8")[1] == data
