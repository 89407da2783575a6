"""Encrypted model store: install/activate/rollback/remove, anti-rollback, disk full, no plaintext on disk."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from edgert.device.importing import import_plaintext
from edgert.errors import IntegrityError, KeyFileError, RollbackError, StoreError
from edgert.security.atomic import FileSystem
from edgert.security.audit import AuditLog, read_records, verify_dir
from edgert.security.keys import DeviceKeys
from edgert.security.loader import load_from_store, open_keystore, open_store
from edgert.security.store import ModelStore
from tests.security.kit import MODELS, SMALL_ONNX, make_package, trusted


def _pkg(tmp_path: Path, keys: DeviceKeys, version: str, model: Path = SMALL_ONNX,
         name: str = "digits") -> Path:
    path = tmp_path / f"{name}-{version}.edgepkg"
    path.write_bytes(make_package(model, [keys], name=name, version=version))
    return path


def _store(state: Path, keys: DeviceKeys, fs: FileSystem | None = None) -> tuple[ModelStore, AuditLog]:
    audit = AuditLog(state / "audit", keys.sign)
    return ModelStore(state / "models", keys, fs=fs, audit=audit, trusted=trusted()), audit


def test_install_activate_rollback_remove(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    store.install(_pkg(tmp_path, device_keys, "1"))
    store.install(_pkg(tmp_path, device_keys, "2"))
    e = store.entry("digits")
    assert (e.active, e.previous, e.installed, e.highest) == ("2", "1", ["1", "2"], "2")
    manifest, plain = store.read_model("digits")
    assert manifest.version == "2" and bytes(plain) == SMALL_ONNX.read_bytes()
    assert store.rollback("digits") == "1"
    assert store.entry("digits").active == "1"
    store.activate("digits", "2")
    store.install(_pkg(tmp_path, device_keys, "3"))
    assert store.entry("digits").installed == ["1", "2", "3"]  # installing never prunes
    assert store.prune("digits", keep=2) == ["1"]
    assert store.entry("digits").installed == ["2", "3"]
    assert not (state / "models" / "packages" / "digits" / "1.edgepkg").exists()
    with pytest.raises(StoreError, match="is active"):
        store.remove("digits", "3")
    assert store.remove("digits", "2") == ["2"]
    assert store.remove("digits", force=True) == ["3"]
    assert store.entries()[0].highest == "3" and store.entries()[0].installed == []
    assert not (state / "models" / "packages" / "digits").exists()  # nothing left behind
    with pytest.raises(RollbackError):  # removal does not reset anti-rollback
        store.install(_pkg(tmp_path, device_keys, "2"))
    audit.close()
    events = [r["event"] for r in read_records(state / "audit")]
    for ev in ("model_install", "model_activate", "model_rollback", "model_remove", "model_install_refused",
               "model_prune"):
        assert ev in events
    assert verify_dir(state / "audit", device_keys.sign_public).ok


def test_downgrade_refused_unless_allowed_and_audited(state: Path, device_keys: DeviceKeys,
                                                      tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    store.install(_pkg(tmp_path, device_keys, "1.10"))
    with pytest.raises(RollbackError, match="anti-rollback") as exc:
        store.install(_pkg(tmp_path, device_keys, "1.9"))
    assert exc.value.hint and "--allow-downgrade" in exc.value.hint
    assert store.entry("digits").active == "1.10"
    store.install(_pkg(tmp_path, device_keys, "1.9"), allow_downgrade=True)
    assert store.entry("digits").active == "1.9" and store.entry("digits").highest == "1.10"
    assert store.activate("digits", "1.9") is False  # already active: a no-op, not a refusal
    assert store.activate("digits", "1.10") is True
    with pytest.raises(RollbackError):
        store.activate("digits", "1.9")  # still below highest, even though installed
    audit.close()
    events = [r["event"] for r in read_records(state / "audit")]
    assert "model_install_refused" in events and "model_downgrade_allowed" in events


def test_tampered_or_foreign_package_is_not_installed(state: Path, device_keys: DeviceKeys,
                                                      tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    store.install(_pkg(tmp_path, device_keys, "1"))
    bad = bytearray(make_package(SMALL_ONNX, [device_keys], version="2"))
    bad[-100] ^= 0x10
    path = tmp_path / "bad.edgepkg"
    path.write_bytes(bytes(bad))
    with pytest.raises(IntegrityError):
        store.install(path)
    foreign = tmp_path / "foreign.edgepkg"
    foreign.write_bytes(make_package(SMALL_ONNX, [DeviceKeys.generate()], version="3"))
    with pytest.raises(KeyFileError):
        store.install(foreign)
    assert store.entry("digits").installed == ["1"] and store.entry("digits").highest == "1"
    assert sorted(p.name for p in (state / "models" / "packages" / "digits").iterdir()) == ["1.edgepkg"]
    audit.close()
    assert "package_verify_failed" in [r["event"] for r in read_records(state / "audit")]


def test_reimporting_a_damaged_copy_of_an_installed_version_is_refused(state: Path, device_keys: DeviceKeys,
                                                                        tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    good = _pkg(tmp_path, device_keys, "1")
    store.install(good)
    bad = bytearray(good.read_bytes())
    bad[len(bad) // 2] ^= 0x01  # inside the encrypted payload; the manifest still matches
    damaged = tmp_path / "damaged.edgepkg"
    damaged.write_bytes(bytes(bad))
    with pytest.raises(IntegrityError):
        store.install(damaged)
    store.install(good)  # the intact file is still accepted as the same version
    assert store.entry("digits").installed == ["1"]
    _manifest, plaintext = store.read_model("digits")
    assert plaintext == SMALL_ONNX.read_bytes()
    audit.close()
    assert "package_verify_failed" in [r["event"] for r in read_records(state / "audit")]


def test_package_file_tampered_after_install_is_refused_at_load(state: Path, device_keys: DeviceKeys,
                                                                tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    store.install(_pkg(tmp_path, device_keys, "1"))
    blob = state / "models" / "packages" / "digits" / "1.edgepkg"
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 1
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        store.read_model("digits")
    audit.close()


class _FullDisk(FileSystem):
    """Raises ENOSPC after ``budget`` bytes, like a full filesystem."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget

    def write_chunks(self, fd: int, chunks):  # type: ignore[no-untyped-def]
        for chunk in chunks:
            if len(chunk) > self.budget:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.budget -= len(chunk)
            os.write(fd, chunk)


@pytest.mark.parametrize("budget", [0, 5000, 10**9])
def test_disk_full_keeps_old_model_active(state: Path, device_keys: DeviceKeys, tmp_path: Path,
                                          budget: int) -> None:
    store, audit = _store(state, device_keys)
    store.install(_pkg(tmp_path, device_keys, "1"))
    pkg2 = _pkg(tmp_path, device_keys, "2")
    full = _FullDisk(budget if budget < 10**9 else pkg2.stat().st_size)  # last: package fits, state does not
    full_store = ModelStore(state / "models", device_keys, fs=full, audit=audit, trusted=trusted())
    with pytest.raises(StoreError, match="no space left") as exc:
        full_store.install(pkg2)
    assert "nothing was changed" in exc.value.message
    reopened = ModelStore(state / "models", device_keys)
    assert reopened.entry("digits").active == "1" and reopened.entry("digits").installed == ["1"]
    assert bytes(reopened.read_model("digits")[1]) == SMALL_ONNX.read_bytes()
    leftovers = [p.name for p in (state / "models").rglob("*") if p.is_file()]
    assert sorted(leftovers) == [".lock", "1.edgepkg", "state.json"]
    audit.close()


def _blocks(plaintext: bytes, size: int = 32) -> list[bytes]:
    """Aligned blocks: any 64-byte run of the plaintext contains one of them whole."""
    blocks = [plaintext[i:i + size] for i in range(0, len(plaintext) - size + 1, size)]
    return [b for b in blocks if len(set(b)) >= 8]  # skip low-entropy runs (zeros) found everywhere


def _scan(roots: list[Path], blocks: list[bytes]) -> list[str]:
    hits = []
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                try:
                    data = path.read_bytes()
                except OSError:
                    continue
                if any(b in data for b in blocks):
                    hits.append(str(path))
    return hits


@pytest.mark.integration
def test_plaintext_never_touches_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgert import Runtime

    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)
    root = tmp_path / "state"
    model_files = [MODELS / "digits_small_int8.onnx", MODELS / "digits_small_int8.tflite"]
    keys = open_keystore(root, create=True)
    store = open_store(root, keys)
    import_plaintext(store, model_files[0], name="digits_small_int8")
    import_plaintext(store, model_files[1], name="digits_small_int8_tflite")
    runtime = Runtime(profile="cpu-generic")
    data = np.load(MODELS / "digits_test.npz")
    for name in ("digits_small_int8", "digits_small_int8_tflite"):
        model = load_from_store(runtime, store, name)
        logits = next(iter(model.infer({"pixels": data["x"][:16]}).values()))
        assert (logits.argmax(1) == data["y"][:16]).mean() >= 0.8
        model.close()
    blocks = [b for f in model_files for b in _blocks(f.read_bytes())]
    assert len(blocks) > 100
    scanned = [root, tmpdir, Path(tempfile.gettempdir())]
    assert _scan(scanned, blocks) == []
    # The scan can fail: a plaintext copy in the state directory is found.
    (root / "leak.bin").write_bytes(b"header" + model_files[0].read_bytes()[100:200])
    assert _scan([root], blocks) == [str(root / "leak.bin")]


def test_state_cache_sees_changes_from_another_process(tmp_path: Path) -> None:
    root = tmp_path / "state"
    keys = open_keystore(root, create=True)
    daemon_view = open_store(root, keys)
    cli_view = open_store(root, keys)
    import_plaintext(cli_view, SMALL_ONNX, name="digits", version="1")
    assert daemon_view.read_model_bytes("digits")[0].version == "1"
    import_plaintext(cli_view, SMALL_ONNX, name="digits", version="2")
    assert daemon_view.read_model_bytes("digits")[0].version == "2"
    cli_view.rollback("digits")
    assert daemon_view.read_model_bytes("digits")[0].version == "1"
    # the cached parse is never handed out for changes: editing a returned state does not leak
    daemon_view._load_state()["models"]["digits"]["active"] = "9"
    assert daemon_view.entry("digits").active == "1"
