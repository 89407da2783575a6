"""Sealed capture in a real daemon: requests over HTTP are captured; only the fleet key opens them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.device.importing import import_plaintext
from edgert.security.loader import open_keystore, open_store
from tests.device.subproc import MODELS, cli, free_port, start_daemon, stop_daemon, write_store_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_REQUESTS = 12


def test_daemon_captures_sampled_requests_sealed_to_the_fleet_key(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(state, open_keystore(state, create=True))
    import_plaintext(store, MODELS / "digits_small_int8.onnx", name="digits", version="1")
    import_plaintext(store, MODELS / "digits_large_int8.onnx", name="other", version="1")
    fleet_key = tmp_path / "fleet" / "capture.pem"
    r = cli("capture", "keygen", str(fleet_key))
    assert r.returncode == 0, r.stderr
    public = r.stdout.strip().splitlines()[-1]
    assert public.startswith("x25519:")
    r = cli("capture", "enable", "digits", "--rate", "1.0", "--max-mb", "5", "--fleet-key", public,
            "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    port = free_port()
    config = write_store_config(tmp_path, state, ["digits", "other"], http_port=port)
    proc = start_daemon(config)
    x = np.load(MODELS / "digits_test.npz")["x"][: N_REQUESTS * 2].reshape(N_REQUESTS, 2, 64)
    answers = []
    try:
        with Client(f"http://127.0.0.1:{port}") as c:
            for i in range(N_REQUESTS):
                answers.append(c.infer("digits", {"pixels": x[i]})["logits"])
                c.infer("other", {"pixels": x[i]})  # capture is off for this model
    finally:
        code, err = stop_daemon(proc)  # shutdown writes whatever is still queued
    assert code == 0, err[-2000:]
    files = sorted((state / "capture" / "digits").glob("*.sealed"))
    assert files and not (state / "capture" / "other").exists()
    out = tmp_path / "opened"
    r = cli("capture", "open", *map(str, files), "--key", str(fleet_key), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert f"{N_REQUESTS} records" in r.stderr
    records = [np.load(p) for p in sorted(out.glob("record-*.npz"))]
    assert len(records) == N_REQUESTS
    # every request is there once, inputs and outputs exactly as served (order is the arrival order)
    for i, rec in enumerate(records):
        np.testing.assert_array_equal(rec["in_pixels"], x[i])
        np.testing.assert_allclose(rec["out_logits"], answers[i], rtol=1e-6)
    # the device's own key cannot open its captures
    r = cli("capture", "open", *map(str, files), "--key", str(state / "keys" / "x25519.pem"))
    assert r.returncode != 0 and "integrity check failed" in r.stderr and r.stdout == ""
