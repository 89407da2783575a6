"""Build edgert's sample models reproducibly: digits CNNs (fp32/int8 ONNX, int8 .tflite) and MobileNetV2.

Needs the ``models`` extra (torch, scikit-learn, onnx, onnxscript, tensorflow-cpu). Usage::

    python tools/make_models.py                  # everything that is committed under models/
    python tools/make_models.py --mobilenet-fp32 # models/generated/mobilenetv2_fp32.onnx (git-ignored)
    python tools/make_models.py --all            # both
    python tools/make_models.py --check          # rebuild into a temp dir, compare with models/
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
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


# --------------------------------------------------------------------------- torch networks


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


# --------------------------------------------------------------------------- ONNX


def export_onnx(model: Any, example: Any, in_name: str) -> bytes:
    """Export fp32 ONNX with a dynamic batch dimension; torch's per-node provenance metadata is stripped."""
    import torch

    batch = torch.export.Dim("N", min=1, max=4096)
    prog = torch.onnx.export(
        model,
        (example,),
        None,
        input_names=[in_name],
        output_names=["logits"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={in_name: {0: batch}},
        verbose=False,
    )
    assert prog is not None  # f=None: the exporter returns the program instead of writing a file
    proto = prog.model_proto
    # The exporter records source-module paths per node; they are noise and leak the build machine's layout.
    for node in proto.graph.node:
        del node.metadata_props[:]
    for vi in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info, *proto.graph.initializer]:
        del vi.metadata_props[:]
    del proto.metadata_props[:]
    return bytes(proto.SerializeToString())


class _Reader:
    """onnxruntime CalibrationDataReader over a list of input arrays."""

    def __init__(self, name: str, rows: list[np.ndarray]) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = iter([{name: r} for r in rows])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_qdq(fp32: bytes, in_name: str, rows: list[np.ndarray], workdir: Path) -> bytes:
    """Static QDQ int8 (uint8 activations, per-channel int8 weights, MinMax) after quant_pre_process."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, out = workdir / "fp32.onnx", workdir / "pre.onnx", workdir / "int8.onnx"
    src.write_bytes(fp32)
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre),
        str(out),
        _Reader(in_name, rows),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out.read_bytes()


def ort_run(model: bytes, name: str, x: np.ndarray) -> np.ndarray:
    """Run an ONNX model from bytes on one thread (deterministic reductions)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], {name: x})[0])


# --------------------------------------------------------------------------- TFLite


def to_keras(spec: DigitsSpec, model: Any) -> Any:
    """The same network in Keras (NHWC) with the trained torch weights copied in."""
    import keras

    inp = keras.Input(shape=(64,), name="pixels")
    x = keras.layers.Reshape((8, 8, 1))(keras.layers.Rescaling(1 / 16)(inp))
    for tok in spec.layers:
        x = (
            keras.layers.MaxPooling2D(2)(x)
            if tok == "p"
            else keras.layers.Conv2D(int(tok[1:]), 3, padding="same", activation="relu")(x)
        )
    ch, hw = x.shape[-1], x.shape[1]
    x = keras.layers.Flatten()(x)
    for width in spec.hidden:
        x = keras.layers.Dense(width, activation="relu")(x)
    out = keras.layers.Dense(10, name="logits")(x)
    km = keras.Model(inp, out)
    from torch import nn

    tconv = [m for m in model.features if isinstance(m, nn.Conv2d)]
    tlin = [m for m in model.head if isinstance(m, nn.Linear)]
    kconv = [la for la in km.layers if isinstance(la, keras.layers.Conv2D)]
    kdense = [la for la in km.layers if isinstance(la, keras.layers.Dense)]
    for conv, k in zip(tconv, kconv, strict=True):
        k.set_weights([_np(conv.weight).transpose(2, 3, 1, 0), _np(conv.bias)])
    for i, (lin, k) in enumerate(zip(tlin, kdense, strict=True)):
        w = _np(lin.weight)
        if i == 0:  # torch flattens (C,H,W), Keras flattens (H,W,C)
            w = w.reshape(-1, ch, hw, hw).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
        k.set_weights([w.T, _np(lin.bias)])
    return km


def _np(t: Any) -> np.ndarray:
    return np.asarray(t.detach().numpy())


def to_tflite_int8(km: Any, calib: np.ndarray) -> bytes:
    """Full-integer int8 .tflite; float32 input/output are kept so the signature matches the ONNX models."""
    import tensorflow as tf

    def representative() -> Iterator[list[np.ndarray]]:
        for row in calib:
            yield [row[None, :]]

    conv = tf.lite.TFLiteConverter.from_keras_model(km)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return rename_signature_outputs(bytes(conv.convert()), {"output_0": "logits"})


def rename_signature_outputs(model: bytes, names: dict[str, str]) -> bytes:
    """Rename signature output keys so the TFLite signature (`pixels` -> `logits`) matches the ONNX one.

    Keras 3's converter always names outputs ``output_0``; the flatbuffer is edited with
    TensorFlow's own ``flatbuffer_utils`` (tensor indices and data are untouched).
    """
    from tensorflow.lite.tools import flatbuffer_utils

    obj = flatbuffer_utils.convert_bytearray_to_object(bytearray(model))
    for sig in obj.signatureDefs or []:
        for out in sig.outputs or []:
            key = out.name.decode() if isinstance(out.name, bytes) else out.name
            if key in names:
                out.name = names[key].encode()
    return bytes(flatbuffer_utils.convert_object_to_bytearray(obj))


def tflite_run(model: bytes, x: np.ndarray) -> np.ndarray:
    """Run a .tflite from bytes with LiteRT, resizing the batch dimension to len(x)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return np.asarray(it.get_tensor(out["index"]))


# --------------------------------------------------------------------------- MobileNetV2


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


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two flattened arrays."""
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --------------------------------------------------------------------------- build


def _io(name: str, shape: list[Any]) -> dict[str, Any]:
    return {"name": name, "dtype": "float32", "shape": shape}


def _accuracy(logits: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    correct = int((logits.argmax(1) == y).sum())
    return {"correct": correct, "n_test": len(y), "accuracy_pct": round(100 * correct / len(y), 2)}


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
    macs = count_macs(model, example)
    common = {
        "family": spec.name,
        "params": n_params(model),
        "macs_per_sample": macs,
        "flops_per_sample": 2 * macs,
        "seed": SEED,
        "committed": True,
        "inputs": [_io("pixels", ["N", 64])],
        "outputs": [_io("logits", ["N", 10])],
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
    cards: dict[str, Any] = {}
    logits: dict[str, np.ndarray] = {}
    for name, (blob, out_logits, meta) in variants.items():
        write_atomic(out / name, blob)
        cards[name] = {
            **common,
            **meta,
            "sha256": sha256(blob),
            "size_bytes": len(blob),
            **_accuracy(out_logits, yte),
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
        "inputs": [_io("input", ["N", 3, 224, 224])],
        "outputs": [_io("logits", ["N", 1000])],
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


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that shaped the bytes."""
    from importlib.metadata import version

    return {
        p: version(p)
        for p in (
            "torch",
            "onnx",
            "onnxscript",
            "onnxruntime",
            "tensorflow-cpu",
            "scikit-learn",
            "numpy",
            "ai-edge-litert",
        )
    }


def build_committed(out: Path) -> dict[str, Any]:
    """Build every committed file into out (models, test split, cards.json, README.md); returns the cards."""
    data = digits_split()
    save_test_set(out / TEST_SET, data[2], data[3])
    models: dict[str, Any] = {}
    logits: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in (SMALL, LARGE):
            cards, lg = build_digits_family(spec, data, out, Path(tmp))
            models.update(cards)
            logits.update(lg)
        models.update(build_mobilenet(out, Path(tmp), None))
    macs_s, macs_l = (
        models["digits_small_fp32.onnx"]["macs_per_sample"],
        models["digits_large_fp32.onnx"]["macs_per_sample"],
    )
    cascade = {
        prec: cascade_table(
            logits[f"digits_small_{prec}.onnx"], logits[f"digits_large_{prec}.onnx"], data[3], macs_s, macs_l
        )
        for prec in ("fp32", "int8")
    }
    cards = {
        "schema": 1,
        "generator": COMMAND,
        "seed": SEED,
        "versions": tool_versions(),
        "dataset": {
            "source": "sklearn.datasets.load_digits (bundled, no download)",
            "file": TEST_SET,
            "split": f"train_test_split(test_size={TEST_FRACTION}, random_state={SEED}, stratify=y)",
            "n_train": len(data[0]),
            "n_test": len(data[2]),
            "sha256": sha256((out / TEST_SET).read_bytes()),
        },
        "cascade_on_test_split": cascade,
        "models": models,
    }
    write_atomic(out / CARDS, (json.dumps(cards, indent=2, sort_keys=True) + "\n").encode())
    write_atomic(out / "README.md", render_readme(cards).encode())
    return cards


# --------------------------------------------------------------------------- README, check, CLI

_README_HEAD = """# Sample models

Generated by `{cmd}` (seed {seed}); do not edit by hand: this file and `cards.json` are rewritten on
every build. `cards.json` holds the same facts in machine-readable form (sha256, size, accuracy,
params, MACs).

Reproduce: `pip install -e '.[models]' && {cmd}`; verify: `{cmd} --check` (rebuilds into a temporary
directory and compares). {repro}

Built with: {versions}.

## Held-out data: `{file}`
{source}, split `{split}`: {n_train} training and {n_test} held-out images. `x` float32 [N, 64] (raw pixel
values 0..16), `y` int64. All accuracies below are on these {n_test} images (one image = {one:.2f} pt).
"""
_REPRO = (
    "Rebuilding on the same machine and library versions gives byte-identical files (torch is forced "
    "single-threaded and deterministic, the .npz has fixed zip timestamps); other CPUs or library versions "
    "may change bytes, which is why tests compare accuracy, not just hashes."
)
_FAMILY = {
    "digits_small": "Small, fast digits CNN: the first stage of the cascade (escalate to the large model "
    "when its "
    "max softmax is low).",
    "digits_large": "Larger, more accurate digits CNN: the cascade's second stage and the reference for "
    "accuracy.",
    "mobilenetv2": "MobileNetV2 (width 1.0, 224x224, 1000 classes) written by hand in torch with seeded "
    "random "
    "weights (torchvision's init; BN running statistics set from seeded random images). "
    "**Intended use: latency and memory work only**; its predictions mean nothing.",
}


def render_readme(cards: dict[str, Any]) -> str:
    """Human model cards, rendered from the machine-readable cards."""
    ds = cards["dataset"]
    text = _README_HEAD.format(
        cmd=COMMAND,
        seed=cards["seed"],
        repro=_REPRO,
        file=ds["file"],
        source=ds["source"],
        split=ds["split"],
        n_train=ds["n_train"],
        n_test=ds["n_test"],
        one=100 / ds["n_test"],
        versions=", ".join(f"{k} {v}" for k, v in cards["versions"].items()),
    )
    for fam, blurb in _FAMILY.items():
        files = {k: v for k, v in cards["models"].items() if v["family"] == fam}
        first = next(iter(files.values()))
        ins = ", ".join(f"`{i['name']}` {i['dtype']} {i['shape']}" for i in first["inputs"])
        outs = ", ".join(f"`{o['name']}` {o['dtype']} {o['shape']}" for o in first["outputs"])
        text += (
            f"\n## {fam}\n{blurb}\n\n- Input: {ins}; output: {outs}. Batch dimension N is dynamic in every "
            f"variant.\n- Parameters: {first['params']:,}; MACs per sample: {first['macs_per_sample']:,} "
            f"(FLOPs = 2 x MACs).\n- Seed: {first['seed']}."
        )
        if "architecture" in first:
            text += f"\n- Architecture: {first['architecture']}.\n- Training: {first['training']}."
        text += (
            "\n\n| file | format | precision | size | sha256 (first 16) | held-out accuracy | how |\n"
            + "|---|---|---|---|---|---|---|\n"
        )
        for name, c in files.items():
            acc = f"{c['accuracy_pct']:.2f}% ({c['correct']}/{c['n_test']})" if "accuracy_pct" in c else "n/a"
            where = f"`{name}`" + ("" if c["committed"] else " (not committed; `--mobilenet-fp32`)")
            text += (
                f"| {where} | {c['format']} | {c['precision']} | {c['size_bytes'] / 1e6:.3f} MB | "
                f"`{c['sha256'][:16]}` | {acc} | {c['how']} |\n"
            )
        int8 = files.get(MOBILENET_INT8)
        if int8:
            cs = int8["logits_cosine_vs_fp32"]
            text += (
                f"\nint8 vs fp32 logits cosine on {cs['n_inputs']} seeded N(0,1) images: min {cs['min']}, "
                f"mean "
                f"{cs['mean']} (centred on the mean over images: {cs['centred_mean']}); top-1 agreement "
                f"{int8['top1_agreement_vs_fp32']}. Speed: `python tools/bench_int8.py`.\n"
            )
    text += (
        "\n## Cascade on the held-out split (informational)\nEscalate to `digits_large` when "
        "`digits_small`'s max softmax is below the threshold; compute is mean MACs relative to the large "
        "model "
        "alone. Thresholds were swept on the held-out split itself, so pick the operating point elsewhere.\n"
    )
    for prec, rows in cards["cascade_on_test_split"].items():
        text += f"\n{prec} ONNX pair:\n\n| threshold | escalated | accuracy | compute vs large |\n"
        text += "|---|---|---|---|\n"
        text += "".join(
            f"| {r['threshold']} | {r['escalated_pct']}% | {r['accuracy_pct']}% | "
            f"{r['mean_macs_vs_large']:.3f} |\n"
            for r in rows
        )
    return text


def check_reproduces() -> int:
    """Rebuild into a temp dir and compare with models/; 0 if every accuracy matches (bytes are reported)."""
    committed = json.loads((MODELS_DIR / CARDS).read_text())["models"]
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = build_committed(Path(tmp))["models"]
        for name, card in fresh.items():
            old = committed.get(name)
            if old is None:
                print(f"NEW      {name}: not in committed cards.json")
                failures += 1
                continue
            same_bytes = old["sha256"] == card["sha256"]
            same_acc = old.get("accuracy_pct") == card.get("accuracy_pct")
            failures += not same_acc
            print(
                f"{'OK' if same_acc else 'DIFFERS':8} {name}: "
                f"bytes {'identical' if same_bytes else 'differ'}, "
                f"accuracy {old.get('accuracy_pct', 'n/a')} -> {card.get('accuracy_pct', 'n/a')}"
            )
        same_npz = (MODELS_DIR / TEST_SET).read_bytes() == (Path(tmp) / TEST_SET).read_bytes()
        failures += not same_npz
        print(
            f"{'OK' if same_npz else 'DIFFERS':8} {TEST_SET}: bytes {'identical' if same_npz else 'differ'}"
        )
    print("reproduces" if failures == 0 else f"{failures} difference(s)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--mobilenet-fp32", action="store_true", help=f"only write models/generated/{MOBILENET_FP32}"
    )
    ap.add_argument("--all", action="store_true", help="committed models and the generated fp32 MobileNetV2")
    ap.add_argument("--check", action="store_true", help="rebuild into a temp dir and compare with models/")
    args = ap.parse_args(argv)
    try:
        import tensorflow  # noqa: F401  (fail early, before minutes of training)
        import torch  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc.name} is not installed\nhint: pip install -e '.[models]'", file=sys.stderr)
        return 2
    if args.check:
        return check_reproduces()
    if not args.mobilenet_fp32:
        cards = build_committed(MODELS_DIR)
        for name, card in cards["models"].items():
            if card["committed"] and card["size_bytes"] > MAX_COMMITTED_BYTES:
                print(
                    f"warning: {name} is {card['size_bytes']} bytes, over the 5 MB commit limit",
                    file=sys.stderr,
                )
            print(f"{name:32} {card['size_bytes']:>10,} B  acc {card.get('accuracy_pct', '-')}")
    if args.mobilenet_fp32 or args.all:  # after the cards, so the sha256 comparison is against this build
        write_fp32_mobilenet()
    return 0


def write_fp32_mobilenet() -> Path:
    """Write the git-ignored fp32 MobileNetV2 and say whether it matches the sha256 in cards.json."""
    fp32, _, _ = mobilenet_fp32()
    path = GENERATED_DIR / MOBILENET_FP32
    write_atomic(path, fp32)
    cards_path = MODELS_DIR / CARDS
    want = (
        json.loads(cards_path.read_text())["models"].get(f"generated/{MOBILENET_FP32}", {}).get("sha256")
        if cards_path.exists()
        else None
    )
    verdict = (
        "matches cards.json" if want == sha256(fp32) else "differs from cards.json (other machine/versions?)"
    )
    print(f"wrote {path} ({len(fp32):,} B), sha256 {verdict}")
    return path


if __name__ == "__main__":
    sys.exit(main())
