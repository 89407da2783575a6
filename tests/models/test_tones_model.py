"""The streaming sample (tone-burst detector): signature, and it hears a burst that the test makes itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

RATE = 16_000


def clip(burst_hz: float | None, seed: int, start_s: float = 0.3, length_s: float = 0.15) -> np.ndarray:
    """One second of noise, with a Hann-windowed sine burst when ``burst_hz`` is given: [1, 1, 16000]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(RATE) * 0.05
    if burst_hz is not None:
        a, n = int(start_s * RATE), int(length_s * RATE)
        x[a : a + n] += 0.4 * np.sin(2 * np.pi * burst_hz * np.arange(n) / RATE) * np.hanning(n)
    return x.astype(np.float32)[None, None, :]


@pytest.mark.parametrize("name", ["tones_fp32.onnx", "tones_int8.onnx"])
def test_tones_signature_and_it_hears_bursts(models_dir: Path, cards: dict[str, Any], name: str) -> None:
    sess = ort.InferenceSession((models_dir / name).read_bytes(), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.shape[1:], out.name, out.shape[1:]) == ("audio", [1, RATE], "logits", [2])
    bursts = np.concatenate([clip(hz, seed) for seed, hz in enumerate((500.0, 1000.0, 2500.0))])
    noise = np.concatenate([clip(None, seed) for seed in range(3)])
    pred = sess.run(["logits"], {"audio": np.concatenate([bursts, noise])})[0].argmax(1)
    assert pred.tolist() == [1, 1, 1, 0, 0, 0]
    assert cards["models"][name]["accuracy_pct"] >= 95.0 and cards["models"][name]["family"] == "tones"
