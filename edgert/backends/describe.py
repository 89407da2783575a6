"""What a model is, read from its bytes alone: format, inputs/outputs and variant.

The one owner of these decisions: the runtime, ``models inspect``, package creation and
``models import`` all ask this module. It is pure (no backend is imported, nothing is written),
so a fleet host without onnxruntime or LiteRT can describe a model, and it never copies the
whole model (plaintext decrypted from the store must not be duplicated in memory).

>>> fmt = sniff_format(data, "digits.onnx")        # "onnx" | "tflite"
>>> inputs, outputs = describe_model(data, fmt)    # [{"name", "dtype", "shape", ...}]
>>> detect_variant(data, fmt)                      # "int8" | "fp16" | "fp32" | "edgetpu"
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from edgert.backends import _onnx_proto, _tflite_schema
from edgert.backends.base import Quantization, TensorSpec
from edgert.errors import ModelError
from edgert.profiles import VARIANTS  # the one list of variants (profiles order them)

__all__ = [
    "EDGETPU_CUSTOM_OP",
    "FORMATS",
    "VARIANTS",
    "describe_file",
    "describe_model",
    "detect_variant",
    "fixed_batch_of_one",
    "model_specs",
    "onnx_unknown_rank_names",
    "sniff_format",
    "tflite_tensor_spec",
]

Buffer = bytes | bytearray | memoryview

FORMATS = ("onnx", "tflite")
#: The custom operator the Edge TPU compiler puts in place of the subgraph it compiled
#: (``edgetpu::kCustomOp`` in libedgetpu's edgetpu.h).
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"
#: First bytes of an encrypted edgert package (edgert/security/package.py MAGIC).
PACKAGE_MAGIC = b"EDGEPKG\0"

#: ONNX TensorProto.DataType -> numpy dtype name, for the types edgert serves.
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
               9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}
_ONNX_OTHER_TYPES = {0: "a non-tensor type (sequence, map or optional)", 8: "string", 14: "complex64",
                     15: "complex128", 16: "bfloat16", 21: "uint4", 22: "int4"}
_ONNX_FLOAT16 = 10
_ONNX_INT8_TYPES = frozenset({2, 3, 21, 22})  # uint8, int8, uint4, int4 initializers
#: ONNX operators that only appear in quantized graphs (ai.onnx and com.microsoft domains).
ONNX_QUANT_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QAttention", "DynamicQuantizeLSTM",
})
_TFLITE_FLOAT16 = 1
_TFLITE_INT8_TYPES = frozenset({3, 9, 17, 20})  # uint8, int8, int4, uint4


def sniff_format(data: Buffer, filename: str | None = None) -> str:
    """``"onnx"`` or ``"tflite"``, decided by content; the file suffix only breaks a tie.

    A 'TFL3' identifier at bytes 4..8 means TFLite and a whole, well-formed ONNX ModelProto
    means ONNX, whatever the file is called. Content that starts like a ModelProto but is
    damaged further on (a truncated copy) is ambiguous: a ``.tflite`` suffix makes it TFLite,
    anything else ONNX, so that the backend reports what is wrong with it. Otherwise ModelError.
    """
    where = filename or "<bytes>"
    head = bytes(data[:8])
    if head == PACKAGE_MAGIC:
        raise ModelError(
            f"model {where} is an encrypted edgert package, not a plain ONNX or TFLite model",
            hint=f"inspect it with 'edgert package inspect {where}', install it with "
            f"'edgert models import --package {where}'",
        )
    if head[4:8] == _tflite_schema.IDENTIFIER:
        return "tflite"
    onnx = _onnx_proto.looks_like_model(data)
    if onnx:
        return "onnx"
    if onnx is None:
        suffix = PurePath(filename).suffix.lower() if filename else ""
        return "tflite" if suffix == ".tflite" else "onnx"
    if not data:
        raise ModelError(f"model {where} is empty", hint="the copy may have failed; copy it again")
    raise ModelError(
        f"model {where} is neither ONNX nor TFLite (no 'TFL3' identifier at bytes 4..8, and not an "
        "ONNX ModelProto)",
        hint="edgert loads .onnx and .tflite model files; if this is one, it is damaged: copy it again",
    )


def _onnx_spec(value: _onnx_proto.OnnxValue) -> TensorSpec:
    dtype = ONNX_DTYPES.get(value.elem_type)
    if dtype is None:
        kind = _ONNX_OTHER_TYPES.get(value.elem_type, f"type code {value.elem_type}")
        raise ModelError(
            f"tensor {value.name!r} has unsupported type {kind}",
            hint="edgert serves numeric tensors (float, int, uint, bool)",
        )
    if value.dims is None:
        return TensorSpec(value.name, np.dtype(dtype), (), rank_known=False)
    return TensorSpec(value.name, np.dtype(dtype), value.dims)


def onnx_unknown_rank_names(data: Buffer) -> frozenset[str]:
    """Names of ONNX graph inputs and outputs declared without a shape (onnxruntime reports ``[]``).

    Empty when the bytes cannot be parsed: onnxruntime, which loaded them, stays the authority.
    """
    try:
        graph = _onnx_proto.parse_model(data)
    except _onnx_proto.MalformedProto:
        return frozenset()
    return frozenset(v.name for v in (*graph.inputs, *graph.outputs) if v.dims is None)


def fixed_batch_of_one(inputs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> bool:
    """True when every TFLite input, as ``(shape, shape_signature)``, has a fixed leading 1.

    Such models (most converters' default) are served row by row, so their batch dimension is
    presented as dynamic.
    """
    return all(
        (len(sig) == 0 or sig[0] == 1) and len(shape) > 0 and shape[0] == 1 for shape, sig in inputs
    )


def tflite_tensor_spec(
    name: str,
    raw_dtype: np.dtype,
    shape: Sequence[int],
    shape_signature: Sequence[int],
    scales: Sequence[float],
    zero_points: Sequence[int],
    batch_of_one: bool,
) -> TensorSpec:
    """The spec callers see for a TFLite tensor: quantized int8/uint8 I/O is float32 for them."""
    dims = list(shape_signature if len(shape_signature) else shape)
    spec_shape: list[int | None] = [None if d < 0 else int(d) for d in dims]
    if batch_of_one and spec_shape and dims[0] == 1:
        spec_shape[0] = None
    raw = np.dtype(raw_dtype)
    quantized = raw.kind in "iu" and len(scales) > 0 and all(s != 0 for s in scales)
    if not quantized:
        return TensorSpec(name, raw, tuple(spec_shape))
    q = Quantization(raw, float(scales[0]), int(zero_points[0]) if len(zero_points) else 0)
    return TensorSpec(name, np.dtype(np.float32), tuple(spec_shape), quantization=q)


def _tflite_spec(name: str, t: _tflite_schema.TfliteTensor, batch_of_one: bool) -> TensorSpec:
    dtype = _tflite_schema.TENSOR_TYPES.get(t.type)
    if dtype is None:
        kind = _tflite_schema.TENSOR_TYPE_NAMES.get(t.type, f"type code {t.type}")
        raise ModelError(
            f"tensor {name!r} has unsupported type {kind}",
            hint="edgert serves numeric tensors (float, int, uint, bool)",
        )
    return tflite_tensor_spec(
        name, np.dtype(dtype), t.shape, t.shape_signature, t.scales, t.zero_points, batch_of_one
    )


def _parse(data: Buffer, fmt: str) -> Any:
    if fmt not in FORMATS:
        raise ModelError(f"unsupported model format {fmt!r}; supported: {', '.join(FORMATS)}")
    try:
        if fmt == "onnx":
            return _onnx_proto.parse_model(data)
        return _tflite_schema.parse_model(data)
    except (_onnx_proto.MalformedProto, _tflite_schema.MalformedFlatbuffer) as exc:
        raise ModelError(
            f"cannot read the {fmt} model: {exc}",
            hint="the file may be truncated or corrupt; copy it again",
        ) from None


def model_specs(data: Buffer, fmt: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the runtime presents them (same names, dtypes and shapes)."""
    parsed = _parse(data, fmt)
    if fmt == "onnx":
        return [_onnx_spec(v) for v in parsed.inputs], [_onnx_spec(v) for v in parsed.outputs]
    batch_of_one = fixed_batch_of_one([(t.shape, t.shape_signature) for _, t in parsed.inputs])
    return (
        [_tflite_spec(n, t, batch_of_one) for n, t in parsed.inputs],
        [_tflite_spec(n, t, batch_of_one) for n, t in parsed.outputs],
    )


def _to_dict(spec: TensorSpec) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": spec.name,
        "dtype": np.dtype(spec.dtype).name,
        "shape": list(spec.shape) if spec.rank_known else None,
    }
    if spec.quantization is not None:
        doc["quantization"] = spec.quantization.to_dict()
    return doc


def describe_model(data: Buffer, fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs as JSON-ready dicts.

    Each is ``{"name", "dtype", "shape"}``: ``shape`` is a list with None for a dynamic
    dimension, ``[]`` for a scalar and None for a tensor of unknown rank. ``dtype`` is what
    callers pass; a quantized TFLite input/output also has
    ``"quantization": {"dtype": "int8", "scale": float, "zero_point": int}``.
    """
    inputs, outputs = model_specs(data, fmt)
    return [_to_dict(s) for s in inputs], [_to_dict(s) for s in outputs]


def _onnx_variant(graph: _onnx_proto.OnnxGraph) -> str:
    ops = {op for _, op in graph.op_types}
    if ops & ONNX_QUANT_OPS or any(op.startswith("QLinear") for op in ops):
        return "int8"
    if graph.initializer_types & _ONNX_INT8_TYPES:
        return "int8"
    io_types = {v.elem_type for v in (*graph.inputs, *graph.outputs)}
    if _ONNX_FLOAT16 in graph.initializer_types or _ONNX_FLOAT16 in io_types:
        return "fp16"
    return "fp32"


def _tflite_variant(model: _tflite_schema.TfliteModel) -> str:
    if EDGETPU_CUSTOM_OP in model.custom_ops:
        return "edgetpu"
    if any(t.type in _TFLITE_INT8_TYPES and t.scales for t in model.tensors):
        return "int8"
    if any(t.type == _TFLITE_FLOAT16 for t in model.tensors):
        return "fp16"
    return "fp32"


def detect_variant(data: Buffer, fmt: str) -> str:
    """``"int8"``, ``"fp16"``, ``"fp32"`` or ``"edgetpu"``, from the model itself (never its file name).

    ONNX: QDQ (QuantizeLinear/DequantizeLinear), QLinear*, ConvInteger/MatMulInteger nodes or
    int8/uint8 initializers mean int8; float16 initializers or I/O mean fp16. TFLite: the Edge
    TPU custom op means edgetpu; int8/uint8 tensors with quantization parameters mean int8;
    float16 tensors mean fp16. Anything else is fp32.
    """
    parsed = _parse(data, fmt)
    return _onnx_variant(parsed) if fmt == "onnx" else _tflite_variant(parsed)


IoDesc = list[dict[str, Any]]


def describe_file(path: str | os.PathLike[str]) -> tuple[str, str, IoDesc, IoDesc]:
    """(format, variant, inputs, outputs) of a model file, read once; what packaging and imports need."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}",
                         hint="check the path and that this user may read it") from exc
    fmt = sniff_format(data, path.name)
    inputs, outputs = describe_model(data, fmt)
    return fmt, detect_variant(data, fmt), inputs, outputs
