"""MobileNetV2 written by hand in torch with seeded weights, its ONNX export and int8 build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .cards import io_card
from .common import (
    COMMAND,
    MOBILENET_BN_BATCHES,
    MOBILENET_BN_SHIFT,
    MOBILENET_CALIB,
    MOBILENET_FP32,
    MOBILENET_INT8,
    OPSET,
    SEED,
    cosine,
    count_macs,
    n_params,
    seed_everything,
    sha256,
    write_atomic,
)
from .convert import export_onnx, ort_run, quantize_qdq


def build_mobilenetv2() -> Any:
    """MobileNetV2 (width 1.0, 224x224, 1000 classes) by hand: 3,504,872 parameters, seeded weights."""
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
        bn = nn.BatchNorm2d(cout, momentum=None)  # momentum=None: cumulative average over the stat batches
        conv = nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False)
        if not act:
            return nn.Sequential(conv, bn)
        nn.init.constant_(bn.bias, MOBILENET_BN_SHIFT)
        return nn.Sequential(conv, bn, nn.ReLU6())

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
            super().__init__()
            hid = cin * t
            mods = [] if t == 1 else [conv_bn(cin, hid, 1, 1)]
            mods += [conv_bn(hid, hid, 3, stride, groups=hid), conv_bn(hid, cout, 1, 1, act=False)]
            self.block = nn.Sequential(*mods)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            return x + self.block(x) if self.residual else self.block(x)

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            feats: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
            cin = 32
            for t, c, n, s in [
                (1, 16, 1, 1),
                (6, 24, 2, 2),
                (6, 32, 3, 2),
                (6, 64, 4, 2),
                (6, 96, 3, 1),
                (6, 160, 3, 2),
                (6, 320, 1, 1),
            ]:
                for i in range(n):
                    feats.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            feats.append(conv_bn(cin, 1280, 1, 1))
            self.features = nn.Sequential(*feats)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, 1000))

        def forward(self, input: Any) -> Any:
            return self.classifier(self.features(input).mean((2, 3)))

    seed_everything()
    model = MobileNetV2()
    for m in model.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    # Untrained BN defaults (mean 0, var 1) let activations explode through 17 blocks, which makes int8
    # meaningless; set the running statistics from seeded random images instead, as a trained net would have.
    gen = torch.Generator().manual_seed(SEED + 1)
    model.train()
    with torch.no_grad():
        for _ in range(MOBILENET_BN_BATCHES):
            model(torch.randn(8, 3, 224, 224, generator=gen))
    return model.eval()


def mobilenet_inputs(n: int, seed: int) -> list[np.ndarray]:
    """n seeded N(0,1) images [1,3,224,224] (calibration uses SEED, evaluation another seed)."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, 224, 224), dtype=np.float32) for _ in range(n)]


def mobilenet_fp32() -> tuple[bytes, int, int]:
    """fp32 MobileNetV2 ONNX bytes, parameter count and MACs."""
    import torch

    model = build_mobilenetv2()
    example = torch.from_numpy(mobilenet_inputs(2, SEED + 2)[0].repeat(2, 0))
    return export_onnx(model, example, "input"), n_params(model), count_macs(model, example)


def build_mobilenet(out: Path, work: Path, fp32_dir: Path | None) -> dict[str, Any]:
    """MobileNetV2: fp32 (written only to fp32_dir, if given) and static-QDQ int8 into out; returns cards."""
    fp32, params, macs = mobilenet_fp32()
    if fp32_dir is not None:
        write_atomic(fp32_dir / MOBILENET_FP32, fp32)
    int8 = quantize_qdq(fp32, "input", mobilenet_inputs(MOBILENET_CALIB, SEED), work)
    evals = mobilenet_inputs(8, SEED + 3)
    a = np.concatenate([ort_run(fp32, "input", x) for x in evals])
    b = np.concatenate([ort_run(int8, "input", x) for x in evals])
    cos = [cosine(ra, rb) for ra, rb in zip(a, b, strict=True)]
    # Centred on the mean over images: the input-dependent part, which raw cosine can hide.
    centred = [cosine(ra, rb) for ra, rb in zip(a - a.mean(0), b - b.mean(0), strict=True)]
    common = {
        "family": "mobilenetv2",
        "params": params,
        "macs_per_sample": macs,
        "flops_per_sample": 2 * macs,
        "seed": SEED,
        "opset": OPSET,
        "format": "onnx",
        "batch": "dynamic",
        "inputs": [io_card("input", ["N", 3, 224, 224])],
        "outputs": [io_card("logits", ["N", 1000])],
        "intended_use": "latency and memory work only: random weights, no meaningful predictions",
    }
    write_atomic(out / MOBILENET_INT8, int8)
    return {
        f"generated/{MOBILENET_FP32}": {
            **common,
            "precision": "fp32",
            "committed": False,
            "sha256": sha256(fp32),
            "size_bytes": len(fp32),
            "how": f"{COMMAND} --mobilenet-fp32 (git-ignored)",
        },
        MOBILENET_INT8: {
            **common,
            "precision": "int8",
            "committed": True,
            "sha256": sha256(int8),
            "size_bytes": len(int8),
            "how": f"quant_pre_process + quantize_static QDQ (U8/S8 per-channel, MinMax) on "
            f"{MOBILENET_CALIB} seeded N(0,1) images",
            "logits_cosine_vs_fp32": {
                "min": round(min(cos), 5),
                "mean": round(float(np.mean(cos)), 5),
                "centred_mean": round(float(np.mean(centred)), 5),
                "n_inputs": len(cos),
                "input_seed": SEED + 3,
            },
            "top1_agreement_vs_fp32": f"{int((a.argmax(1) == b.argmax(1)).sum())}/{len(cos)}",
        },
    }
