"""The streaming sample: a small 1-D CNN that detects tone bursts in noise at 16 kHz (fp32 and int8 ONNX).

Training and test clips are synthesised here from a seeded generator (no downloads): one second of
Gaussian noise at a random level, and in half the clips a Hann-windowed sine burst of random
frequency, length, position and amplitude. Input ``audio`` float32 [N, 1, 16000] (a 1 s window; a
stream feeds it with ``window = 16000``), output ``logits`` float32 [N, 2] (0 = noise, 1 = burst).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .cards import accuracy_card, io_card
from .common import OPSET, SEED, sha256, write_atomic
from .convert import export_onnx, ort_run, quantize_qdq

RATE = 16_000
WINDOW = RATE  # one second
TRAIN_STEPS = 1200
TRAIN_BATCH = 32
TEST_CLIPS = 400
CALIB_CLIPS = 100
LR = 3e-3
FREQ_HZ = (300.0, 4000.0)
BURST_S = (0.04, 0.3)
AMPLITUDE = (0.1, 0.6)
NOISE_STD = (0.02, 0.2)
# conv layers: (out channels, kernel, stride); then a max over time and a linear layer to 2 classes
LAYERS = ((8, 64, 16), (16, 9, 4), (16, 9, 4))
ARCHITECTURE = "conv1d 8k64s16 - conv1d 16k9s4 - conv1d 16k9s4 (ReLU) - max over time - linear 16->2"


def synth(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` one-second clips [n, 1, 16000] float32 and labels (1 = a tone burst is present)."""
    t = np.arange(WINDOW, dtype=np.float64) / RATE
    x = rng.standard_normal((n, WINDOW)) * rng.uniform(*NOISE_STD, size=(n, 1))
    y = (rng.random(n) < 0.5).astype(np.int64)
    for i in np.flatnonzero(y):
        length = int(rng.uniform(*BURST_S) * RATE)
        start = int(rng.integers(0, WINDOW - length))
        freq, amp, phase = rng.uniform(*FREQ_HZ), rng.uniform(*AMPLITUDE), rng.uniform(0, 2 * np.pi)
        burst = amp * np.sin(2 * np.pi * freq * t[:length] + phase) * np.hanning(length)
        x[i, start : start + length] += burst
    return x.astype(np.float32)[:, None, :], y


def build_net() -> Any:
    """The torch module (seeded by the caller)."""
    from torch import nn

    class TonesNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            cin = 1
            for cout, k, s in LAYERS:
                layers += [nn.Conv1d(cin, cout, k, stride=s), nn.ReLU()]
                cin = cout
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(cin, 2)

        def forward(self, audio: Any) -> Any:
            return self.head(self.features(audio).amax(dim=-1))

    return TonesNet()


def macs_per_sample() -> int:
    """Multiply-accumulates for one 1 s clip."""
    length, cin, total = WINDOW, 1, 0
    for cout, k, s in LAYERS:
        length = (length - k) // s + 1
        total += length * cout * cin * k
        cin = cout
    return total + cin * 2


def train(rng: np.random.Generator) -> Any:
    """Train on freshly synthesised batches (Adam, cosine schedule)."""
    import torch

    from .common import seed_everything

    seed_everything()
    net = build_net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, TRAIN_STEPS)
    loss_fn = torch.nn.CrossEntropyLoss()
    net.train()
    for _ in range(TRAIN_STEPS):
        xb, yb = synth(TRAIN_BATCH, rng)
        opt.zero_grad()
        loss = loss_fn(net(torch.from_numpy(xb)), torch.from_numpy(yb))
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


def build_tones(out: Path, workdir: Path) -> dict[str, Any]:
    """Train, export fp32 and int8 ONNX into ``out``; returns their cards."""
    import onnxruntime
    import torch

    rng = np.random.default_rng(SEED)
    net = train(rng)
    xte, yte = synth(TEST_CLIPS, np.random.default_rng(SEED + 1))
    calib, _ = synth(CALIB_CLIPS, np.random.default_rng(SEED + 2))
    fp32 = export_onnx(net, torch.from_numpy(xte[:2]), "audio")
    int8 = quantize_qdq(fp32, "audio", [calib[i : i + 1] for i in range(len(calib))], workdir)
    common = {
        "family": "tones",
        "committed": True,
        "inputs": [io_card("audio", ["N", 1, WINDOW])],
        "outputs": [io_card("logits", ["N", 2])],
        "params": int(sum(p.numel() for p in net.parameters())),
        "macs_per_sample": macs_per_sample(),
        "flops_per_sample": 2 * macs_per_sample(),
        "seed": SEED,
        "architecture": ARCHITECTURE,
        "training": f"Adam lr {LR} cosine, {TRAIN_STEPS} steps of {TRAIN_BATCH} synthesised clips",
        "test_data": f"{TEST_CLIPS} synthesised clips (generator seed {SEED + 1}), half with a burst",
        "built_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "opset": OPSET,
        "batch": "dynamic",
        "format": "onnx",
    }
    variants = {
        "tones_fp32.onnx": (fp32, {"precision": "fp32", "how": "torch.onnx.export (dynamo), dynamic batch"}),
        "tones_int8.onnx": (
            int8,
            {
                "precision": "int8",
                "how": "quant_pre_process + quantize_static QDQ, U8 activations / per-channel S8 weights, "
                f"MinMax, {CALIB_CLIPS} synthesised calibration clips",
            },
        ),
    }
    cards: dict[str, Any] = {}
    for name, (blob, meta) in variants.items():
        write_atomic(out / name, blob)
        logits = ort_run(blob, "audio", xte)
        cards[name] = {
            **common,
            **meta,
            "sha256": sha256(blob),
            "size_bytes": len(blob),
            **accuracy_card(logits, yte),
        }
    return cards
