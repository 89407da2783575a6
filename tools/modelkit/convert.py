"""Format conversion: torch -> ONNX (fp32), static QDQ int8 quantization, Keras copy -> int8 TFLite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .common import OPSET

if TYPE_CHECKING:
    from .digits import DigitsSpec


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


def to_tflite_int8(km: Any, calib: np.ndarray, int8_io: bool = False) -> bytes:
    """Full-integer int8 .tflite with float32 input/output, or int8 input/output when ``int8_io``.

    The int8-I/O variant is what Edge TPU compilers and many vendor tools produce; it exercises the
    runtime's quantize-on-input / dequantize-on-output path.
    """
    import tensorflow as tf

    def representative() -> Iterator[list[np.ndarray]]:
        for row in calib:
            yield [row[None, :]]

    conv = tf.lite.TFLiteConverter.from_keras_model(km)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if int8_io:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
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
    if inp["dtype"] == np.int8:  # int8 I/O: quantize with the tensor's own scale and zero point
        scale, zero = inp["quantization"]
        x = np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    it.set_tensor(inp["index"], x)
    it.invoke()
    y = np.asarray(it.get_tensor(out["index"]))
    if out["dtype"] == np.int8:
        scale, zero = out["quantization"]
        y = ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y
