"""Sealed capture: only the fleet key opens it; sampling and the size cap hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from edgert.errors import ConfigError, IntegrityError
from edgert.security.capture import (
    CaptureSettings,
    CaptureWriter,
    generate_fleet_key,
    load_capture_config,
    open_capture,
    save_capture_config,
)
from edgert.security.keys import load_private_key_file, parse_public_key


def test_round_trip_and_device_cannot_read(tmp_path: Path) -> None:
    fleet_pub = parse_public_key(generate_fleet_key(tmp_path / "fleet" / "capture.pem"))
    fleet_key = load_private_key_file(tmp_path / "fleet" / "capture.pem")
    assert isinstance(fleet_key, x25519.X25519PrivateKey)
    w = CaptureWriter(tmp_path / "capture", "digits", fleet_pub, rate=1.0, max_bytes=1 << 20)
    x = np.arange(64, dtype=np.float32).reshape(1, 64)
    assert w.maybe_capture({"pixels": x}, {"logits": x[:, :10] * 2}, request_id="r1")
    assert w.maybe_capture({"pixels": x + 1}, {"logits": x[:, :10]})
    w.close()
    (path,) = (tmp_path / "capture" / "digits").glob("*.sealed")
    assert x.tobytes()[:64] not in path.read_bytes()
    records = list(open_capture(path, fleet_key))
    assert len(records) == 2 and records[0].meta["request_id"] == "r1"
    np.testing.assert_array_equal(records[0].inputs["pixels"], x)
    np.testing.assert_array_equal(records[1].outputs["logits"], x[:, :10])
    device_key = x25519.X25519PrivateKey.generate()
    with pytest.raises(IntegrityError):
        list(open_capture(path, device_key))
    data = bytearray(path.read_bytes())
    data[-5] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        list(open_capture(path, fleet_key))


def test_sampling_and_cap(tmp_path: Path) -> None:
    pub = x25519.X25519PrivateKey.generate().public_key()
    draws = iter([0.9, 0.1, 0.6, 0.2] * 100)
    w = CaptureWriter(tmp_path, "m", pub, rate=0.5, max_bytes=4000, rng=lambda: next(draws))
    x = {"a": np.zeros((1, 64), np.float32)}
    results = [w.maybe_capture(x, x) for _ in range(4)]
    assert results == [False, True, False, True]
    for _ in range(100):
        w.maybe_capture(x, x)
    w.close()
    used = sum(p.stat().st_size for p in (tmp_path / "m").glob("*.sealed"))
    assert used <= 4000 and w.captured >= 2
    off = CaptureWriter(tmp_path, "n", pub, rate=0.0, max_bytes=4000, rng=lambda: pytest.fail("sampled"))
    assert not off.maybe_capture(x, x)


def test_config_validation(tmp_path: Path) -> None:
    pub = generate_fleet_key(tmp_path / "k.pem")
    save_capture_config(tmp_path / "cap", {"digits": CaptureSettings(0.1, 1000, pub)})
    assert load_capture_config(tmp_path / "cap")["digits"].rate == 0.1
    with pytest.raises(ConfigError, match="between 0 and 1"):
        CaptureSettings(1.5, 1000, pub).validate("digits")
    with pytest.raises(ConfigError, match="already exists"):
        generate_fleet_key(tmp_path / "k.pem")
