"""What a model file is: its format (sniffed) and its input/output description."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.errors import ModelError

__all__ = ["describe_model", "sniff_format"]

FORMATS = ("onnx", "tflite")


def sniff_format(data: bytes | bytearray | memoryview, filename: str | None = None) -> str:
    """Return "onnx" or "tflite" from the bytes (TFLite has a 'TFL3' identifier), else the suffix."""
    head = bytes(data[:8])
    if head[4:8] == b"TFL3":
        return "tflite"
    suffix = Path(filename).suffix.lower().lstrip(".") if filename else ""
    if suffix in FORMATS:
        return suffix
    if head[:1] == b"\x08":  # ONNX ModelProto starts with field 1 (ir_version), a varint
        return "onnx"
    raise ModelError(f"cannot tell the format of model {filename or '<bytes>'}",
                     hint="use an .onnx or .tflite file, or pass --format")


def _spec(name: str, dtype: Any, shape: Any) -> dict[str, Any]:
    dims = [d if isinstance(d, int) and d >= 0 else None for d in (shape or [])]
    return {"name": str(name), "dtype": str(dtype), "shape": dims}


def _describe_runtime(data: bytes, fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    try:
        from edgert.runtime import Runtime
    except ImportError:  # the runtime is optional for packaging (fleet hosts may lack backends)
        return None
    runtime = Runtime(profile="cpu-generic")
    model = runtime.load(data, format=fmt)
    try:
        return ([_spec(s.name, s.dtype, s.shape) for s in model.inputs],
                [_spec(s.name, s.dtype, s.shape) for s in model.outputs])
    finally:
        model.close()


def _ort_dtype(type_str: str) -> str:
    table = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int32)": "int32",
             "tensor(int64)": "int64", "tensor(bool)": "bool"}
    return table.get(type_str, type_str)


def _describe_direct(data: bytes, fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if fmt == "onnx":
        import onnxruntime as ort

        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return ([_spec(i.name, _ort_dtype(i.type), i.shape) for i in sess.get_inputs()],
                [_spec(o.name, _ort_dtype(o.type), o.shape) for o in sess.get_outputs()])
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data)
    def conv(d: dict[str, Any]) -> dict[str, Any]:
        sig = d.get("shape_signature", d["shape"])
        return _spec(d["name"], np.dtype(d["dtype"]).name, [int(x) if x >= 0 else None for x in sig])
    return ([conv(d) for d in interp.get_input_details()], [conv(d) for d in interp.get_output_details()])


def describe_model(data: bytes, fmt: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of a model as JSON-ready dicts {name, dtype, shape (None = dynamic)}."""
    try:
        described = _describe_runtime(data, fmt)
        if described is not None:
            return described
        return _describe_direct(data, fmt)
    except ModelError:
        raise
    except Exception as exc:  # onnxruntime/LiteRT raise their own types on corrupt models
        raise ModelError(f"cannot load the {fmt} model to read its inputs and outputs: {type(exc).__name__}",
                         hint="check that the file is a valid model for this format") from exc
