"""Fixtures for the security tests: a state directory with device keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgert.security.keys import DeviceKeys, init_keystore, load_keystore


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """A state directory with device keys created in it."""
    root = tmp_path / "state"
    init_keystore(root / "keys")
    return root


@pytest.fixture
def device_keys(state: Path) -> DeviceKeys:
    """The keys of the ``state`` device."""
    return load_keystore(state / "keys")
