"""`edgert demo` serves the streaming sample: 10 ms chunks in, a tone-burst verdict every 100 ms hop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from tests.device.test_demo import EXIT_TIMEOUT_S, REPO, free_port, wait_ready

pytestmark = pytest.mark.integration

RATE, CHUNK, WINDOW, HOP = 16_000, 160, 16_000, 1_600
BURST_S = (1.9, 2.05)  # a 150 ms, 1 kHz burst in 2.5 s of noise


def audio() -> np.ndarray:
    rng = np.random.default_rng(7)
    x = rng.standard_normal(int(2.5 * RATE)) * 0.05
    a, b = (int(t * RATE) for t in BURST_S)
    x[a:b] += 0.4 * np.sin(2 * np.pi * 1000 * np.arange(b - a) / RATE) * np.hanning(b - a)
    return x.astype(np.float32)


def test_demo_streams_the_tone_model_with_a_result_every_hop(tmp_path: Path) -> None:
    home, tmpdir = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmpdir.mkdir()
    sock = tmp_path / "demo.sock"
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmpdir), "XDG_STATE_HOME": str(home / "state")}
    cmd = [sys.executable, "-m", "edgert.cli.main", "demo", "--http", f"127.0.0.1:{free_port()}"]
    proc = subprocess.Popen(
        [*cmd, "--socket", str(sock)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_ready(proc, sock)
        signal_ = audio()
        chunks = [
            (i, i * CHUNK / RATE, signal_[i * CHUNK : (i + 1) * CHUNK][None, :])
            for i in range(len(signal_) // CHUNK)
        ]
        with Client(f"unix://{sock}") as c:
            assert "tones" in c.models()
            stream = c.stream("tones", chunks, window=WINDOW, hop=HOP, policy="all")
            results = list(stream)
        # one result per hop once the first window is full: chunks 99, 109, ..., 249
        assert [r.id for r in results] == list(range(WINDOW // CHUNK - 1, len(chunks), HOP // CHUNK))
        assert all(r.error is None and r.dropped == 0 for r in results)
        verdict = {round(r.ts + CHUNK / RATE - 1.0, 1): int(r.outputs["logits"].argmax()) for r in results}
        # windows [start, start + 1 s): wholly before the burst -> 0, wholly covering it -> 1
        quiet = [verdict[s] for s in verdict if s + 1.0 <= BURST_S[0]]
        loud = [verdict[s] for s in verdict if s <= BURST_S[0] and s + 1.0 >= BURST_S[1]]
        assert len(quiet) == 10 and len(loud) == 5
        assert quiet == [0] * 10 and loud == [1] * 5
        assert stream.info is not None and stream.info["window"] == WINDOW and stream.info["axis"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"tones" in out and b"Traceback" not in err
