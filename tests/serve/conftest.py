"""Fixtures: a real daemon serving the digits models on loopback ports and a socket."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from edgert.config import parse_config
from tests.serve.daemon_harness import MODELS, Running, config_text, start_daemon


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A daemon serving digits-small, digits-large and the digits cascade (short read timeout)."""
    tmp = tmp_path_factory.mktemp("daemon")
    cfg = parse_config(config_text(tmp, "read_timeout_s = 0.5\nmax_body_bytes = 1048576\n"), "test")
    running = start_daemon(cfg)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits (x float32 [N,64], y int64)."""
    data = np.load(MODELS / "digits_test.npz")
    return data["x"], data["y"]
