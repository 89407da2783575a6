"""Hot swap from the encrypted store under load: zero failed requests; a failed load keeps the old one."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client, notify_daemon_activate
from edgert.config import parse_config
from edgert.device.importing import import_plaintext
from edgert.errors import RollbackError, UnknownModelError
from edgert.security.loader import open_keystore, open_store
from tests.serve.daemon_harness import start_daemon

pytestmark = pytest.mark.integration

MODELS = Path(__file__).resolve().parents[2] / "models"


def test_swap_under_load_and_failed_load(tmp_path):
    state = tmp_path / "state"
    store = open_store(state, open_keystore(state, create=True))
    import_plaintext(store, MODELS / "digits_small_int8.onnx", name="digits", version="1")
    text = f"""
[daemon]
profile = "cpu-generic"
state_dir = "{state}"
[http]
listen = "127.0.0.1:0"
[metrics]
listen = ""
[socket]
path = "{tmp_path / "edgert.sock"}"
[[models]]
name = "digits"
"""
    running = start_daemon(parse_config(text, "swap.toml"))
    try:
        sock = running.socket
        x = np.load(MODELS / "digits_test.npz")["x"][:16]
        # version 2 arrives in the store (installed, not active) while version 1 serves
        import_plaintext(store, MODELS / "digits_large_int8.onnx", name="digits", version="2", activate=False)
        stop = threading.Event()
        failures: list[BaseException] = []
        versions: set[str] = set()
        counts = [0]

        def hammer(url: str) -> None:
            try:
                with Client(url) as c:
                    while not stop.is_set():
                        out = c.infer("digits", {"pixels": x})["logits"]
                        assert out.shape == (16, 10)
                        counts[0] += 1
            except BaseException as exc:
                failures.append(exc)

        threads = [
            threading.Thread(target=hammer, args=(u,)) for u in [running.http_url, "unix://" + sock] * 3
        ]
        for t in threads:
            t.start()
        assert notify_daemon_activate("digits", "2", socket=sock)
        with Client("unix://" + sock) as c:
            assert c.metadata("digits")["versions"] == ["2"]
            # a version that is not installed: the daemon refuses with the store's reason, 2 keeps serving
            with pytest.raises(UnknownModelError, match="model 'digits' has no installed version '7'"):
                c.load("digits", "7")
            assert c.metadata("digits")["versions"] == ["2"]
        # back to 1 over HTTP (Triton's repository extension) is below the anti-rollback floor: refused
        with Client(running.http_url) as c:
            with pytest.raises(RollbackError, match="refusing to activate digits 1: 2 has been active"):
                c.load("digits", "1")
            versions.add(c.metadata("digits")["versions"][0])
        # an explicit, audited downgrade over the socket (what `edgert models rollback` sends) is served
        with Client("unix://" + sock) as c:
            c.load("digits", "1", allow_downgrade=True)
            versions.add(c.metadata("digits")["versions"][0])
        assert store.entry("digits").active == "1"
        stop.set()
        for t in threads:
            t.join(30)
        assert not failures, repr(failures[0])
        assert counts[0] > 0 and versions == {"2", "1"}
        assert notify_daemon_activate("digits", "1", socket=str(tmp_path / "missing.sock")) is False
    finally:
        running.stop()
