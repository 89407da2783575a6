"""Device keystore: file modes, refusal of loose permissions, public-only output."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from edgert.errors import KeyFileError
from edgert.security.keys import KEY_FILES, init_keystore, load_keystore, parse_public_key


def test_init_creates_private_files(tmp_path: Path) -> None:
    kdir = tmp_path / "keys"
    keys = init_keystore(kdir)
    assert stat.S_IMODE(kdir.stat().st_mode) == 0o700
    for name in KEY_FILES.values():
        st = (kdir / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    again = load_keystore(kdir)
    assert again.wrap_fingerprint == keys.wrap_fingerprint
    assert not list(kdir.glob("*.tmp"))


def test_init_never_overwrites(tmp_path: Path) -> None:
    init_keystore(tmp_path / "keys")
    with pytest.raises(KeyFileError, match="already exist"):
        init_keystore(tmp_path / "keys")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_loose_permissions_are_refused(tmp_path: Path, mode: int) -> None:
    kdir = tmp_path / "keys"
    init_keystore(kdir)
    os.chmod(kdir / KEY_FILES["wrap"], mode)
    with pytest.raises(KeyFileError, match="too open") as exc:
        load_keystore(kdir)
    assert exc.value.hint == f"run: chmod 600 {kdir / KEY_FILES['wrap']}"


def test_missing_and_wrong_type_keys(tmp_path: Path) -> None:
    kdir = tmp_path / "keys"
    init_keystore(kdir)
    (kdir / KEY_FILES["sign"]).unlink()
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keystore(kdir)
    os.replace(kdir / KEY_FILES["wrap"], kdir / KEY_FILES["sign"])
    init2 = tmp_path / "k2"
    init_keystore(init2)
    os.replace(init2 / KEY_FILES["tls"], kdir / KEY_FILES["wrap"])
    with pytest.raises(KeyFileError, match="wrong key type"):
        load_keystore(kdir)


def test_public_summary_has_no_private_material(tmp_path: Path) -> None:
    keys = init_keystore(tmp_path / "keys")
    text = repr(keys.public_summary()) + repr(keys)
    assert "PRIVATE" not in text
    for name in KEY_FILES.values():
        body = (tmp_path / "keys" / name).read_text().splitlines()[1]
        assert body not in text
    assert parse_public_key(keys.public_summary()["wrap_public_key"]).public_bytes_raw() == \
        keys.wrap_public.public_bytes_raw()
    assert b"CERTIFICATE REQUEST" in keys.tls_csr("device-1")


def test_bad_recipient_text() -> None:
    for text in ("x25519:notbase64!!", "x25519:AAAA", "ed25519:AAAA", "hello"):
        with pytest.raises(KeyFileError):
            parse_public_key(text)


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o705, 0o710])
def test_shared_keys_directory_is_refused_with_a_chmod_hint(tmp_path: Path, mode: int) -> None:
    kdir = tmp_path / "keys"
    init_keystore(kdir)
    os.chmod(kdir, mode)
    with pytest.raises(KeyFileError, match=f"permissions {mode:04o} for {kdir} are too open") as exc:
        load_keystore(kdir)
    assert exc.value.hint == f"run: chmod 700 {kdir}"
    os.chmod(kdir, 0o700)
    load_keystore(kdir)


def test_init_makes_missing_parents_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        init_keystore(tmp_path / "a" / "b" / "keys")
    finally:
        os.umask(old)
    for d in ("a", "a/b", "a/b/keys"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700, d
    with pytest.raises(KeyFileError, match="does not exist"):
        load_keystore(tmp_path / "missing" / "keys")
