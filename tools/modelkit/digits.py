"""The digits CNNs: architecture specs, deterministic training, and the build of one model family."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cards import accuracy_card, io_card
from .common import (
    BATCH,
    CALIB_SAMPLES,
    LR,
    OPSET,
    SEED,
    calibration_rows,
    count_macs,
    n_params,
    seed_everything,
    sha256,
    write_atomic,
)
from .convert import export_onnx, ort_run, quantize_qdq, tflite_run, to_keras, to_tflite_int8


@dataclass(frozen=True)
class DigitsSpec:
    """One digits CNN: conv widths ("c<N>", 3x3 same + ReLU) and 2x2 max pools ("p"), then a dense head."""

    name: str
    layers: tuple[str, ...]
    hidden: tuple[int, ...]
    dropout: float
    epochs: int


SMALL = DigitsSpec("digits_small", ("c8", "p", "c16", "p"), (), 0.0, 60)
LARGE = DigitsSpec("digits_large", ("c32", "c64", "p", "c128", "p"), (128,), 0.3, 60)


def build_digits(spec: DigitsSpec) -> Any:
    """The torch module for a digits spec; input `pixels` [N,64] in 0..16, output logits [N,10]."""
    from torch import nn

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            feats: list[nn.Module] = []
            ch, hw = 1, 8
            for tok in spec.layers:
                if tok == "p":
                    feats.append(nn.MaxPool2d(2))
                    hw //= 2
                else:
                    feats += [nn.Conv2d(ch, int(tok[1:]), 3, padding=1), nn.ReLU()]
                    ch = int(tok[1:])
            head: list[nn.Module] = [nn.Flatten()]
            dim = ch * hw * hw
            for width in spec.hidden:
                head += [nn.Linear(dim, width), nn.ReLU(), nn.Dropout(spec.dropout)]
                dim = width
            head.append(nn.Linear(dim, 10))
            self.features = nn.Sequential(*feats)
            self.head = nn.Sequential(*head)

        def forward(self, pixels: Any) -> Any:
            # Normalisation lives in the graph so every runtime feeds raw sklearn values.
            return self.head(self.features((pixels / 16.0).reshape(-1, 1, 8, 8)))

    return DigitsNet()


def _shift(xb: Any, gen: Any) -> Any:
    """Augment: shift each 8x8 image by up to one pixel (zero fill), drawn from a seeded generator."""
    import torch

    imgs = torch.nn.functional.pad(xb.reshape(-1, 8, 8), (1, 1, 1, 1))
    off = torch.randint(0, 3, (len(xb), 2), generator=gen)
    out = torch.stack([imgs[i, r : r + 8, c : c + 8] for i, (r, c) in enumerate(off.tolist())])
    return out.reshape(-1, 64)


def train_digits(spec: DigitsSpec, xtr: np.ndarray, ytr: np.ndarray) -> Any:
    """Train a digits net deterministically (Adam, cosine LR, shift augmentation); returns it in eval mode."""
    import torch

    seed_everything()
    model = build_digits(spec)
    gen = torch.Generator().manual_seed(SEED)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=spec.epochs)
    model.train()
    for _ in range(spec.epochs):
        for idx in torch.randperm(len(x), generator=gen).split(BATCH):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(_shift(x[idx], gen)), y[idx])
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def build_digits_family(
    spec: DigitsSpec, data: tuple[np.ndarray, ...], out: Path, work: Path
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Train one digits net and write its fp32 ONNX, int8 ONNX and int8 .tflite; returns cards and logits."""
    import torch

    xtr, ytr, xte, yte = data
    model = train_digits(spec, xtr, ytr)
    example = torch.from_numpy(xte[:2])
    calib = calibration_rows(xtr)
    fp32 = export_onnx(model, example, "pixels")
    int8 = quantize_qdq(fp32, "pixels", [r[None, :] for r in calib], work)
    keras_model = to_keras(spec, model)
    with torch.no_grad():
        gap = np.abs(keras_model(xte).numpy() - model(torch.from_numpy(xte)).numpy()).max()
    if gap > 1e-3:
        raise RuntimeError(f"Keras copy of {spec.name} disagrees with torch by {gap}: weight layout bug")
    tfl = to_tflite_int8(keras_model, calib)
    tfl_io = to_tflite_int8(keras_model, calib, int8_io=True) if spec.name == "digits_small" else None
    macs = count_macs(model, example)
    common = {
        "family": spec.name,
        "params": n_params(model),
        "macs_per_sample": macs,
        "flops_per_sample": 2 * macs,
        "seed": SEED,
        "committed": True,
        "inputs": [io_card("pixels", ["N", 64])],
        "outputs": [io_card("logits", ["N", 10])],
        "architecture": f"{'-'.join(spec.layers)} | dense {list(spec.hidden)} -> 10 (conv 3x3 same + ReLU)",
        "training": f"Adam lr {LR} cosine, wd 1e-4, {spec.epochs} epochs, batch {BATCH}, +-1 px shifts",
    }
    variants: dict[str, tuple[bytes, np.ndarray, dict[str, Any]]] = {
        f"{spec.name}_fp32.onnx": (
            fp32,
            ort_run(fp32, "pixels", xte),
            {
                "format": "onnx",
                "precision": "fp32",
                "opset": OPSET,
                "batch": "dynamic",
                "how": "torch.onnx.export(dynamo=True), per-node metadata stripped",
            },
        ),
        f"{spec.name}_int8.onnx": (
            int8,
            ort_run(int8, "pixels", xte),
            {
                "format": "onnx",
                "precision": "int8",
                "opset": OPSET,
                "batch": "dynamic",
                "how": "quant_pre_process + quantize_static QDQ, U8 activations / per-channel S8 weights, "
                f"MinMax, {CALIB_SAMPLES} training-split calibration images",
            },
        ),
        f"{spec.name}_int8.tflite": (
            tfl,
            tflite_run(tfl, xte),
            {
                "format": "tflite",
                "precision": "int8",
                "batch": "dynamic (shape_signature -1; resize_tensor_input)",
                "how": "same torch weights copied into Keras (NHWC), TFLiteConverter.from_keras_model "
                "(signature output renamed to logits), "
                f"full-integer TFLITE_BUILTINS_INT8 with {CALIB_SAMPLES} training-split representative "
                "images; float32 input/output kept (Quantize/Dequantize ops at the edges)",
            },
        ),
    }
    if tfl_io is not None:
        variants[f"{spec.name}_int8io.tflite"] = (
            tfl_io,
            tflite_run(tfl_io, xte),
            {
                "format": "tflite",
                "precision": "int8",
                "batch": "dynamic (shape_signature -1; resize_tensor_input)",
                "how": "as the int8 .tflite, but with int8 input and output tensors (inference_input_type "
                "and inference_output_type int8), as Edge TPU toolchains emit; edgert quantizes inputs "
                "and dequantizes outputs from the tensors' scale and zero point",
            },
        )
    cards: dict[str, Any] = {}
    logits: dict[str, np.ndarray] = {}
    for name, (blob, out_logits, meta) in variants.items():
        write_atomic(out / name, blob)
        cards[name] = {
            **common,
            **meta,
            "sha256": sha256(blob),
            "size_bytes": len(blob),
            **accuracy_card(out_logits, yte),
        }
        logits[name] = out_logits
    return cards, logits


def cascade_table(
    small: np.ndarray, large: np.ndarray, y: np.ndarray, macs_s: int, macs_l: int
) -> list[dict[str, float]]:
    """Small-then-large cascade on the held-out split: escalate when small's max softmax < threshold."""
    p = np.exp(small - small.max(1, keepdims=True))
    conf = (p / p.sum(1, keepdims=True)).max(1)
    rows = []
    for t in (0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
        esc = conf < t
        pred = np.where(esc, large.argmax(1), small.argmax(1))
        rows.append(
            {
                "threshold": t,
                "escalated_pct": round(100 * float(esc.mean()), 2),
                "accuracy_pct": round(100 * float((pred == y).mean()), 2),
                "mean_macs_vs_large": round((macs_s + float(esc.mean()) * macs_l) / macs_l, 4),
            }
        )
    return rows
