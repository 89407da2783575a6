"""`edgert models activate|rollback` reach a real daemon subprocess; the daemon's audit trail verifies."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.device.importing import import_plaintext
from edgert.security.audit import read_records, verify_dir
from edgert.security.loader import open_keystore, open_store
from tests.device.models_kit import flip_payload_byte
from tests.device.subproc import MODELS, cli, start_daemon, stop_daemon, write_store_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]



def _served(sock: Path, name: str) -> str:
    with Client(f"unix://{sock}") as c:
        versions: list[str] = c.metadata(name)["versions"]
        return versions[0]


def _wait_for_event(audit_dir: Path, event: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["event"] == event for r in read_records(audit_dir)):
        assert time.monotonic() < deadline, f"no {event} audit record"
        time.sleep(0.05)


def test_activate_and_rollback_reach_the_daemon_and_are_audited(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys = open_keystore(state, create=True)
    store = open_store(state, keys)
    import_plaintext(store, MODELS / "digits_small_int8.onnx", name="digits", version="1")
    import_plaintext(store, MODELS / "digits_large_int8.onnx", name="digits", version="2")
    config = write_store_config(tmp_path, state, ["digits"])
    sock = tmp_path / "edgert.sock"
    proc = start_daemon(config)
    try:
        x = np.load(MODELS / "digits_test.npz")["x"][:4]
        assert _served(sock, "digits") == "2"
        # rollback through the CLI: the store and the daemon both go to 1 (socket from --config)
        r = cli("models", "rollback", "digits", "--config", str(config))
        assert r.returncode == 0, r.stderr
        assert f"the daemon at {sock} now serves digits 1" in r.stdout
        assert _served(sock, "digits") == "1"
        # activate 2 again, naming the socket directly
        r = cli("models", "activate", "digits", "2", "--state-dir", str(state), "--socket", str(sock))
        assert r.returncode == 0, r.stderr
        assert _served(sock, "digits") == "2"
        # version 1's package is damaged on disk: the daemon refuses it and nothing changes, store included
        flip_payload_byte(state / "models" / "packages" / "digits" / "1.edgepkg")
        r = cli("models", "rollback", "digits", "--config", str(config))
        assert r.returncode != 0
        assert "kept serving the previous version of digits; nothing changed" in r.stderr
        assert "integrity check failed" in r.stderr and "hint:" in r.stderr
        assert _served(sock, "digits") == "2" and store.entry("digits").active == "2"
        with Client(f"unix://{sock}") as c:
            assert c.infer("digits", {"pixels": x})["logits"].shape == (4, 10)
        # no daemon on this socket: the offline Deployer refuses the damaged version too
        r = cli("models", "rollback", "digits", "--state-dir", str(state), "--socket", str(tmp_path / "none"))
        assert r.returncode != 0 and "integrity check failed" in r.stderr
        assert store.entry("digits").active == "2"
        # SIGHUP is audited as a config reload
        proc.send_signal(signal.SIGHUP)
        _wait_for_event(state / "audit", "config_reload")
    finally:
        code, err = stop_daemon(proc)
    assert code == 0, err[-2000:]
    records = list(read_records(state / "audit"))
    events = [r["event"] for r in records]
    for expected in ("daemon_start", "model_deployed", "model_deploy_failed", "model_activate",
                     "config_reload", "daemon_stop"):
        assert expected in events, (expected, events)
    # order: boot deploys, the daemon reports started, CLI-driven deployments follow, it stops last
    first_cli = next(i for i, r in enumerate(records)
                     if r["event"] == "model_deployed" and r["data"]["origin"] == "repository")
    start, stop = events.index("daemon_start"), events.index("daemon_stop")
    assert events.index("model_deployed") < start < first_cli < stop
    assert events[-2:] == ["daemon_stop", "checkpoint"]
    swaps = [r["data"] for r in records
             if r["event"] == "model_deployed" and r["data"]["origin"] == "repository"]
    assert {"model": "digits", "version": "1", "previous": "2"}.items() <= swaps[0].items()
    failed = next(r["data"] for r in records if r["event"] == "model_deploy_failed")
    assert failed["model"] == "digits" and failed["kept"] == "2" and failed["version"] == "1"
    assert failed["stage"] == "load"
    report = verify_dir(state / "audit", keys.sign_public)
    assert report.ok and report.unsigned_tail == 0, report
    # the check can fail: an edited daemon record breaks the chain
    path = sorted((state / "audit").glob("audit-*.jsonl"))[-1]
    path.write_text(path.read_text().replace('"daemon_start"', '"daemon_stort"'))
    assert not verify_dir(state / "audit", keys.sign_public).ok
