"""Shared by every model build: paths, constants, seeding, hashing, atomic writes and the digits data."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]  # tools/modelkit/common.py -> repository root
MODELS_DIR = ROOT / "models"
GENERATED_DIR = MODELS_DIR / "generated"
MOBILENET_FP32 = "mobilenetv2_fp32.onnx"
MOBILENET_INT8 = "mobilenetv2_int8.onnx"
TEST_SET = "digits_test.npz"
CARDS = "cards.json"

SEED = 0
OPSET = 18
TEST_FRACTION = 0.2  # stratified, random_state=SEED: 360 of sklearn's 1,797 digits are held out
CALIB_SAMPLES = 300  # digits calibration images, taken from the *training* split
MOBILENET_CALIB = 64  # seeded N(0, 1) images for MobileNetV2 calibration
MOBILENET_BN_BATCHES = 4  # batches of 8 random images used to set BN running statistics
# BN beta before each ReLU6. With beta 0 every pre-activation is centred and the random net is chaotic: int8
# noise grows through the depth (logits cosine 0.97). Beta 1 keeps most units in ReLU6's linear range
# (cosine 0.9997).
MOBILENET_BN_SHIFT = 1.0
BATCH = 64
LR = 3e-3
MAX_COMMITTED_BYTES = 5 * 1024 * 1024
COMMAND = "python tools/make_models.py"


def seed_everything() -> None:
    """Fix every RNG and force single-threaded deterministic torch kernels."""
    import torch

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def sha256(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temp file and os.replace so an interrupted build never leaves half a model."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- data


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn's bundled digits (no download), split 80/20 stratified with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    ds = load_digits()
    x = ds.data.astype(np.float32)
    y = ds.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y)
    return xtr, ytr, xte, yte


def calibration_rows(xtr: np.ndarray) -> np.ndarray:
    """CALIB_SAMPLES training images picked by a seeded permutation."""
    idx = np.random.default_rng(SEED).permutation(len(xtr))[:CALIB_SAMPLES]
    return xtr[np.sort(idx)]


def save_test_set(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write the held-out split as .npz with fixed zip timestamps so bytes reproduce (np.savez's don't)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, arr in (("x", x), ("y", y)):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(
                zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)),
                member.getvalue(),
                compress_type=zipfile.ZIP_DEFLATED,
            )
    write_atomic(path, buf.getvalue())


# --------------------------------------------------------------------------- model statistics


def count_macs(model: Any, example: Any) -> int:
    """Multiply-accumulates per sample of the Conv2d and Linear layers (one forward pass with hooks)."""
    import torch
    from torch import nn

    total = [0]

    def hook(mod: Any, _inp: Any, out: Any) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total[0] += out[0].numel() * k
        else:
            total[0] += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(example[:1])
    for h in handles:
        h.remove()
    return total[0]


def n_params(model: Any) -> int:
    """Trainable parameter count (BN running statistics are buffers and do not count)."""
    return int(sum(p.numel() for p in model.parameters()))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
