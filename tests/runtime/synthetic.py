"""Tiny models built in the test, for shapes and variants the committed sample models lack.

ONNX models are built with the ``onnx`` package (dev extra); TFLite flatbuffers with the schema
classes LiteRT ships (``ai_edge_litert.schema_py_generated``) and ``flatbuffers``. Every model
here is either run by the real runtime or rejected by it in a way the test checks, so a
mistake in a builder shows up as a failing test rather than a silently wrong fixture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# TFLite TensorType / BuiltinOperator codes (tensorflow/lite/schema/schema.fbs)
FLOAT32, FLOAT16, UINT8, INT8 = 0, 1, 3, 9
ADD, DEQUANTIZE, MUL, CUSTOM = 0, 6, 18, 32


def onnx_model(inputs, outputs, nodes, initializers=(), opset: int = 13, ir_version: int = 8) -> bytes:
    """Serialized ONNX model from ``onnx.helper`` value infos, nodes and initializers."""
    from onnx import helper

    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model.SerializeToString()


def onnx_relu(shape: Sequence[int | str] | None, elem_type: int = 1) -> bytes:
    """``y = Relu(x)`` with ``x`` declared with ``shape`` (None: no shape at all, i.e. unknown rank)."""
    from onnx import helper

    x = helper.make_tensor_value_info("x", elem_type, shape)
    y = helper.make_tensor_value_info("y", elem_type, shape)
    return onnx_model([x], [y], [helper.make_node("Relu", ["x"], ["y"])])


@dataclass
class TflTensor:
    """One tensor of a synthetic TFLite model."""

    name: str
    shape: list[int]
    type: int = FLOAT32
    signature: list[int] | None = None
    scale: list[float] = field(default_factory=list)
    zero_point: list[int] = field(default_factory=list)
    data: bytes | None = None  # constant contents (a weight), else an activation


def tflite_model(
    tensors: Sequence[TflTensor],
    inputs: Sequence[int],
    outputs: Sequence[int],
    ops: Sequence[tuple[int, Sequence[int], Sequence[int]]],
    opcodes: Sequence[tuple[int, str | None]],
    signature: dict[str, dict[str, int]] | None = None,
) -> bytes:
    """A TFLite flatbuffer: ``ops`` are ``(opcode index, input tensors, output tensors)``,
    ``opcodes`` are ``(builtin code, custom code or None)``; ``signature`` maps
    ``{"inputs": {name: tensor}, "outputs": {name: tensor}}`` for a ``serving_default`` SignatureDef."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as s

    model = s.ModelT()
    model.version = 3
    model.description = "edgert synthetic test model"
    empty = s.BufferT()
    model.buffers = [empty]
    model.operatorCodes = []
    for builtin, custom in opcodes:
        oc = s.OperatorCodeT()
        oc.builtinCode = builtin
        oc.deprecatedBuiltinCode = min(builtin, 127)
        oc.version = 1
        if custom is not None:
            oc.customCode = custom
        model.operatorCodes.append(oc)
    sub = s.SubGraphT()
    sub.tensors = []
    for t in tensors:
        tt = s.TensorT()
        tt.name = t.name
        tt.shape = list(t.shape)
        tt.type = t.type
        if t.signature is not None:
            tt.shapeSignature = list(t.signature)
        tt.buffer = 0
        if t.data is not None:
            buf = s.BufferT()
            buf.data = np.frombuffer(t.data, dtype=np.uint8)
            model.buffers.append(buf)
            tt.buffer = len(model.buffers) - 1
        if t.scale:
            q = s.QuantizationParametersT()
            q.scale = list(t.scale)
            q.zeroPoint = list(t.zero_point)
            tt.quantization = q
        sub.tensors.append(tt)
    sub.inputs = list(inputs)
    sub.outputs = list(outputs)
    sub.operators = []
    for index, ins, outs in ops:
        op = s.OperatorT()
        op.opcodeIndex = index
        op.inputs = list(ins)
        op.outputs = list(outs)
        sub.operators.append(op)
    sub.name = "main"
    model.subgraphs = [sub]
    if signature is not None:
        sig = s.SignatureDefT()
        sig.signatureKey = "serving_default"
        sig.subgraphIndex = 0

        def maps(pairs: dict[str, int]) -> list:
            out = []
            for name, index in pairs.items():
                m = s.TensorMapT()
                m.name = name
                m.tensorIndex = index
                out.append(m)
            return out

        sig.inputs = maps(signature["inputs"])
        sig.outputs = maps(signature["outputs"])
        model.signatureDefs = [sig]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def tflite_scalar_add() -> bytes:
    """``y = x + x`` on a rank-0 float32 input (a scalar, e.g. a threshold or temperature)."""
    return tflite_model(
        [TflTensor("x", []), TflTensor("y", [])], [0], [1], [(0, [0, 0], [1])], [(ADD, None)]
    )


def tflite_scale_by_scalar() -> bytes:
    """``y = x * scale`` with ``x`` float32[N, 4] (dynamic batch) and ``scale`` a rank-0 input."""
    return tflite_model(
        [
            TflTensor("x", [1, 4], signature=[-1, 4]),
            TflTensor("scale", []),
            TflTensor("y", [1, 4], signature=[-1, 4]),
        ],
        [0, 1],
        [2],
        [(0, [0, 1], [2])],
        [(MUL, None)],
        signature={"inputs": {"x": 0, "scale": 1}, "outputs": {"y": 2}},
    )


def tflite_fp16_weights() -> bytes:
    """``y = x + dequantize(w)`` with a float16 constant ``w`` (post-training float16 style)."""
    w = np.arange(4, dtype=np.float16).tobytes()
    return tflite_model(
        [
            TflTensor("x", [1, 4]),
            TflTensor("w16", [4], type=FLOAT16, data=w),
            TflTensor("w", [4]),
            TflTensor("y", [1, 4]),
        ],
        [0],
        [3],
        [(0, [1], [2]), (1, [0, 2], [3])],
        [(DEQUANTIZE, None), (ADD, None)],
    )


def tflite_edgetpu() -> bytes:
    """What the Edge TPU compiler emits: uint8 quantized I/O around one ``edgetpu-custom-op``."""
    q = {"scale": [0.0078125], "zero_point": [128]}
    return tflite_model(
        [TflTensor("input", [1, 8], type=UINT8, **q), TflTensor("output", [1, 8], type=UINT8, **q)],
        [0],
        [1],
        [(0, [0], [1])],
        [(CUSTOM, "edgetpu-custom-op")],
    )
