"""Store semantics for the Deployer (issue 8 and issue 9 D10): no silent pruning, check before acting,
rollback that can be repeated and guarded, failure marks, and no trace of a refused package."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.errors import KeyFileError, RollbackError, SecurityError, StoreError
from edgert.security.audit import AuditLog, read_records
from edgert.security.keys import DeviceKeys
from edgert.security.store import DEFAULT_KEEP_VERSIONS, ModelStore
from tests.security.kit import SMALL_ONNX, make_package, trusted


def _store(state: Path, keys: DeviceKeys) -> tuple[ModelStore, AuditLog]:
    audit = AuditLog(state / "audit", keys.sign)
    return ModelStore(state / "models", keys, audit=audit, trusted=trusted()), audit


def _install(store: ModelStore, keys: DeviceKeys, tmp_path: Path, version: str, **kwargs: bool) -> None:
    path = tmp_path / f"digits-{version}.edgepkg"
    path.write_bytes(make_package(SMALL_ONNX, [keys], version=version))
    store.install(path, **kwargs)  # type: ignore[arg-type]


def _events(state: Path, audit: AuditLog, event: str) -> list[dict]:
    audit.close()
    return [r["data"] for r in read_records(state / "audit") if r["event"] == event]


def test_install_never_prunes_and_prune_is_explicit(state: Path, device_keys: DeviceKeys,
                                                    tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    for v in ("1", "2", "3", "4", "5"):
        _install(store, device_keys, tmp_path, v)
    # Before issue 8 this was ['4', '5']: installing 5 silently deleted 3.
    assert store.entry("digits").installed == ["1", "2", "3", "4", "5"]
    assert DEFAULT_KEEP_VERSIONS == 3
    assert store.prune("digits") == ["1", "2"]
    assert store.entry("digits").installed == ["3", "4", "5"] and store.prune("digits") == []
    on_disk = sorted(p.name for p in (state / "models" / "packages" / "digits").iterdir())
    assert on_disk == ["3.edgepkg", "4.edgepkg", "5.edgepkg"]
    assert [(e["version"], e["keep"]) for e in _events(state, audit, "model_prune")] == [("1", 3), ("2", 3)]


def test_prune_never_removes_active_or_previous(state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    for v in ("1", "2", "3", "4"):
        _install(store, device_keys, tmp_path, v, activate=v in ("1", "2"))
    assert (store.entry("digits").active, store.entry("digits").previous) == ("2", "1")
    # 3 and 4 are pending (installed above the active version, not yet served): never pruned
    assert store.prune("digits", keep=1) == []
    assert store.entry("digits").installed == ["1", "2", "3", "4"]
    store.activate("digits", "4")
    assert store.prune("digits", keep=3) == ["1"]  # active 4, previous 2, then the highest other: 3
    assert store.entry("digits").installed == ["2", "3", "4"]
    with pytest.raises(StoreError, match="cannot keep 0 versions"):
        store.prune("digits", keep=0)
    with pytest.raises(StoreError, match="not installed"):
        store.prune("other")
    audit.close()


def test_check_activate_raises_what_activate_would_and_changes_nothing(state: Path, device_keys: DeviceKeys,
                                                                      tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    _install(store, device_keys, tmp_path, "2")
    _install(store, device_keys, tmp_path, "1", allow_downgrade=True, activate=False)
    state_file = state / "models" / "state.json"
    before = state_file.read_bytes()
    with pytest.raises(StoreError, match="no installed version '7'"):
        store.check_activate("digits", "7")
    with pytest.raises(RollbackError, match="anti-rollback"):
        store.check_activate("digits", "1")
    store.check_activate("digits", "1", allow_downgrade=True)
    store.check_activate("digits", "2")
    assert state_file.read_bytes() == before
    for version, kwargs in (("7", {}), ("1", {})):
        with pytest.raises((StoreError, RollbackError)):
            store.activate("digits", version, **kwargs)
    assert state_file.read_bytes() == before
    assert store.activate("digits", "2") is False  # already active: no-op, nothing written
    assert state_file.read_bytes() == before
    assert store.activate("digits", "1", allow_downgrade=True) is True
    assert store.entry("digits").active == "1"
    audit.close()


def test_rollback_swaps_and_a_second_rollback_returns(state: Path, device_keys: DeviceKeys,
                                                      tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    for v in ("1", "2", "3"):  # A -> B -> C
        _install(store, device_keys, tmp_path, v)
    assert store.rollback("digits") == "2"
    assert (store.entry("digits").active, store.entry("digits").previous) == ("2", "3")
    assert store.rollback("digits") == "3"  # a second rollback returns to where we were
    assert (store.entry("digits").active, store.entry("digits").previous) == ("3", "2")
    before = (state / "models" / "state.json").read_bytes()
    with pytest.raises(StoreError, match="previous version is now 2"):
        store.rollback("digits", expect="1")  # someone changed the store since we looked
    assert (state / "models" / "state.json").read_bytes() == before
    assert store.rollback("digits", expect="2") == "2"
    audit.close()


def test_failure_marks_are_listed_and_cleared_on_activation(state: Path, device_keys: DeviceKeys,
                                                           tmp_path: Path) -> None:
    store, audit = _store(state, device_keys)
    _install(store, device_keys, tmp_path, "1")
    _install(store, device_keys, tmp_path, "2", activate=False)
    store.mark_failed("digits", "2", "warm-up failed: NaN outputs")
    assert store.entry("digits").failed == {"2": "warm-up failed: NaN outputs"}
    with pytest.raises(StoreError):
        store.mark_failed("digits", "9", "x")
    assert store.activate("digits", "2") is True
    assert store.entry("digits").failed == {}
    store.mark_failed("digits", "1", "hung")
    assert store.rollback("digits") == "1" and store.entry("digits").failed == {}
    store.mark_failed("digits", "1", "hung again")
    assert store.activate("digits", "1") is False and store.entry("digits").failed == {}  # cleared, no change
    assert [e["version"] for e in _events(state, audit, "model_failed")] == ["2", "1", "1"]


@pytest.mark.parametrize("kind", ["foreign", "untrusted", "damaged"])
def test_refused_package_leaves_no_model_directory(state: Path, device_keys: DeviceKeys, tmp_path: Path,
                                                   kind: str) -> None:
    # Issue 9 D10: before the fix a refused package left an empty packages/<name>/ ('foreign' case:
    # the store listed ['foreign'] after KeyFileError).
    store, audit = _store(state, device_keys)
    if kind == "foreign":
        data = make_package(SMALL_ONNX, [DeviceKeys.generate()], name="foreign")
    elif kind == "untrusted":
        data = make_package(SMALL_ONNX, [device_keys], name="foreign",
                            signer=ed25519.Ed25519PrivateKey.generate())
    else:
        damaged = bytearray(make_package(SMALL_ONNX, [device_keys], name="foreign"))
        damaged[-10] ^= 0x01
        data = bytes(damaged)
    path = tmp_path / "p.edgepkg"
    path.write_bytes(data)
    with pytest.raises(SecurityError):
        store.install(path)
    assert list((state / "models" / "packages").iterdir()) == []
    # A model dir holding other versions stays.
    _install(store, device_keys, tmp_path, "1")
    bad = bytearray(make_package(SMALL_ONNX, [DeviceKeys.generate()], version="2"))
    path.write_bytes(bytes(bad))
    with pytest.raises(KeyFileError):
        store.install(path)
    assert [p.name for p in (state / "models" / "packages" / "digits").iterdir()] == ["1.edgepkg"]
    audit.close()


def test_the_floor_is_the_highest_activated_version_not_the_highest_installed(
        state: Path, device_keys: DeviceKeys, tmp_path: Path) -> None:
    """A pending update that never served (here: installed, not activated) must not lock out 3."""
    store, audit = _store(state, device_keys)
    for v in ("2", "3"):
        _install(store, device_keys, tmp_path, v)
    _install(store, device_keys, tmp_path, "4", activate=False)
    assert store.entry("digits").highest == "3"
    store.check_activate("digits", "3")  # the active one, and the floor
    with pytest.raises(RollbackError, match="refusing to activate digits 2: 3 has been active"):
        store.check_activate("digits", "2")
    assert store.activate("digits", "4") is True
    assert store.entry("digits").highest == "4"
    with pytest.raises(RollbackError, match="refusing to activate digits 3: 4 has been active"):
        store.check_activate("digits", "3")
    audit.close()
