"""One package, several variants (issue 8): install, list, decrypt and load each one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert.errors import StoreError
from edgert.security.keys import DeviceKeys
from edgert.security.loader import load_from_store
from edgert.security.store import MMAP_MIN_PAYLOAD, ModelStore
from tests.security.kit import MODELS, SMALL_ONNX, SMALL_TFLITE, make_package, source, trusted

BIG_ONNX = MODELS / "mobilenetv2_int8.onnx"


def _install(state: Path, keys: DeviceKeys, tmp_path: Path, sources: list, version: str = "1") -> ModelStore:
    store = ModelStore(state / "models", keys, trusted=trusted())
    path = tmp_path / f"digits-{version}.edgepkg"
    path.write_bytes(make_package(sources, [keys], version=version))
    store.install(path)
    return store


def test_two_variants_install_and_each_decrypts_to_its_original(state: Path, device_keys: DeviceKeys,
                                                                tmp_path: Path) -> None:
    store = _install(state, device_keys, tmp_path, [source(SMALL_ONNX), source(SMALL_TFLITE, "int8-tflite")])
    assert store.variants("digits") == store.variants("digits", "1") == ["int8", "int8-tflite"]
    assert store.entry("digits").variants == {"1": ["int8", "int8-tflite"]}
    first, onnx = store.read_model_bytes("digits")
    assert (first.variant, first.format) == ("int8", "onnx") and onnx == SMALL_ONNX.read_bytes()
    second, tfl = store.read_model_bytes("digits", "1", variant="int8-tflite")
    assert (second.variant, second.format) == ("int8-tflite", "tflite") and tfl == SMALL_TFLITE.read_bytes()
    assert bytes(store.read_model("digits", variant="int8-tflite")[1]) == SMALL_TFLITE.read_bytes()
    vm = store.variant_manifest("digits", "1", "int8-tflite")
    assert (vm.name, vm.version, vm.format, vm.plaintext_size) == ("digits", "1", "tflite",
                                                                   SMALL_TFLITE.stat().st_size)
    with pytest.raises(StoreError, match="has no variant 'fp16'") as exc:
        store.read_model_bytes("digits", variant="fp16")
    assert exc.value.hint == "its variants: int8, int8-tflite"


def test_large_variant_after_a_small_one_uses_the_mmap_path(state: Path, device_keys: DeviceKeys,
                                                            tmp_path: Path) -> None:
    assert BIG_ONNX.stat().st_size >= MMAP_MIN_PAYLOAD
    store = _install(state, device_keys, tmp_path, [source(SMALL_TFLITE), source(BIG_ONNX, "int8-big")])
    _m, big = store.read_model_bytes("digits", variant="int8-big")  # payload at a non-zero offset
    assert big == BIG_ONNX.read_bytes()
    assert store.read_model_bytes("digits")[1] == SMALL_TFLITE.read_bytes()


@pytest.mark.integration
def test_load_from_store_loads_the_chosen_variant(state: Path, device_keys: DeviceKeys,
                                                  tmp_path: Path) -> None:
    from edgert import Runtime

    store = _install(state, device_keys, tmp_path, [source(SMALL_ONNX), source(SMALL_TFLITE, "int8-tflite")])
    runtime = Runtime(profile="cpu-generic")
    data = np.load(MODELS / "digits_test.npz")
    seen: list[str] = []
    for variant, fmt in ((None, "onnx"), ("int8-tflite", "tflite")):
        model = load_from_store(runtime, store, "digits", "1", variant=variant,
                                on_manifest=lambda m: seen.append(m.variant))
        assert model.format == fmt and model.variant == (variant or "int8")
        logits = next(iter(model.infer({"pixels": data["x"][:32]}).values()))
        assert (logits.argmax(1) == data["y"][:32]).mean() >= 0.8
        model.close()
    assert seen == ["int8", "int8-tflite"]
