"""The store's read path for small packages: system calls counted by the kernel, not timed.

Issue 10: an encrypted load of a ~10 KB model cost a fixed ~0.45 ms over a plaintext one. Part of it
was the package read in many small system calls (a buffered header read, a seek, the payload in
chunks). A small package is now read with one ``read``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgert.device.importing import import_plaintext
from edgert.errors import IntegrityError
from edgert.security.keys import DeviceKeys
from edgert.security.loader import open_store
from edgert.security.store import SMALL_PACKAGE_MAX, ModelStore

MODELS = Path(__file__).resolve().parents[2] / "models"
#: read(2) calls a small package may take: the whole file in one.
MAX_READS = 1


def _read_syscalls() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("syscr:"):
            return int(line.split()[1])
    raise AssertionError("no syscr in /proc/self/io")


def _store(state: Path, keys: DeviceKeys) -> ModelStore:
    store = open_store(state, keys)
    import_plaintext(store, MODELS / "digits_small_int8.onnx", name="digits")
    return store


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_small_package_is_read_in_one_call(state: Path, device_keys: DeviceKeys) -> None:
    store = _store(state, device_keys)
    store.read_model_bytes("digits")  # state.json parsed and cached; keys loaded
    reads = []
    for _ in range(5):
        before = _read_syscalls()
        probe = _read_syscalls() - before  # what reading /proc/self/io itself costs
        before = _read_syscalls()
        _, data = store.read_model_bytes("digits")
        reads.append(_read_syscalls() - before - probe)
    assert data == (MODELS / "digits_small_int8.onnx").read_bytes()
    assert min(reads) <= MAX_READS, f"read(2) calls per small-package load: {reads}"


def test_small_package_is_below_the_threshold(state: Path, device_keys: DeviceKeys) -> None:
    store = _store(state, device_keys)
    assert store._package_path("digits", "1").stat().st_size <= SMALL_PACKAGE_MAX


@pytest.mark.parametrize("cut", [1, 100])
def test_truncated_small_package_still_fails_integrity(
    state: Path, device_keys: DeviceKeys, cut: int
) -> None:
    store = _store(state, device_keys)
    path = store._package_path("digits", "1")
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    with pytest.raises(IntegrityError):
        store.read_model_bytes("digits")


def test_appended_bytes_still_fail_integrity(state: Path, device_keys: DeviceKeys) -> None:
    store = _store(state, device_keys)
    path = store._package_path("digits", "1")
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(IntegrityError):
        store.read_model_bytes("digits")


def test_flipped_payload_byte_still_fails_integrity(state: Path, device_keys: DeviceKeys) -> None:
    store = _store(state, device_keys)
    path = store._package_path("digits", "1")
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.read_model_bytes("digits")
