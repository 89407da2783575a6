"""A minimal, read-only walk of a TFLite flatbuffer: tensors, signatures and operator codes.

Pure Python, so a fleet host without LiteRT can still describe a ``.tflite`` model and detect
its variant. Only the tables and fields below are read (slot numbers from tensorflow/lite's
``schema.fbs``, checked against ``ai_edge_litert.schema_py_generated``); every offset is bounds
checked and a bad one raises :class:`MalformedFlatbuffer`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["MalformedFlatbuffer", "TfliteModel", "TfliteTensor", "parse_model"]

Buffer = bytes | bytearray | memoryview

IDENTIFIER = b"TFL3"
#: TFLite TensorType enum value -> numpy dtype name (None: not a numeric tensor edgert serves).
TENSOR_TYPES: dict[int, str | None] = {
    0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 5: None, 6: "bool", 7: "int16",
    8: "complex64", 9: "int8", 10: "float64", 11: "complex128", 12: "uint64", 13: None, 14: None,
    15: "uint32", 16: "uint16",
}
TENSOR_TYPE_NAMES = {17: "int4", 18: "bfloat16", 19: "int2", 20: "uint4", 21: "float8_e4m3fn",
                     22: "float8_e5m2", 5: "string", 13: "resource", 14: "variant"}

# table slots (field index in schema.fbs)
_MODEL_OPCODES, _MODEL_SUBGRAPHS, _MODEL_SIGNATURES = 1, 2, 7
_OPCODE_CUSTOM = 1
_SUBGRAPH_TENSORS, _SUBGRAPH_INPUTS, _SUBGRAPH_OUTPUTS = 0, 1, 2
_TENSOR_SHAPE, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_QUANT, _TENSOR_SIGNATURE = 0, 1, 3, 4, 7
_QUANT_SCALE, _QUANT_ZERO = 2, 3
_SIG_INPUTS, _SIG_OUTPUTS, _SIG_KEY, _SIG_SUBGRAPH = 0, 1, 2, 4
_MAP_NAME, _MAP_INDEX = 0, 1


class MalformedFlatbuffer(ValueError):
    """An offset or length in the flatbuffer points outside the data."""


@dataclass(frozen=True)
class TfliteTensor:
    """One tensor: TensorType code, shape, shape signature (-1 = dynamic), quantization."""

    name: str
    type: int
    shape: tuple[int, ...]
    shape_signature: tuple[int, ...]
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]


@dataclass(frozen=True)
class TfliteModel:
    """Tensors of the serving subgraph, its inputs/outputs as ``(name, tensor)`` and custom op codes.

    ``from_signature`` says whether the names come from a SignatureDef (as LiteRT's signature
    runner reports them) or are the raw tensor names of subgraph 0.
    """

    inputs: tuple[tuple[str, TfliteTensor], ...]
    outputs: tuple[tuple[str, TfliteTensor], ...]
    tensors: tuple[TfliteTensor, ...]
    custom_ops: frozenset[str]
    from_signature: bool


class _Reader:
    def __init__(self, buf: Buffer) -> None:
        self.buf = buf
        self.size = len(buf)

    def _unpack(self, fmt: str, pos: int) -> int:
        if pos < 0 or pos + struct.calcsize(fmt) > self.size:
            raise MalformedFlatbuffer(f"offset {pos} outside the {self.size}-byte model")
        value: int = struct.unpack_from(fmt, self.buf, pos)[0]
        return value

    def root(self) -> int:
        return self._unpack("<I", 0)

    def field(self, table: int, slot: int) -> int:
        """Absolute position of a field in ``table``, or 0 when it is absent."""
        vtable = table - self._unpack("<i", table)
        vt_size = self._unpack("<H", vtable)
        entry = 4 + 2 * slot
        if entry + 2 > vt_size:
            return 0
        off = self._unpack("<H", vtable + entry)
        return table + off if off else 0

    def scalar(self, table: int, slot: int, fmt: str, default: int = 0) -> int:
        pos = self.field(table, slot)
        return self._unpack(fmt, pos) if pos else default

    def indirect(self, pos: int) -> int:
        return pos + self._unpack("<I", pos)

    def table(self, table: int, slot: int) -> int:
        pos = self.field(table, slot)
        return self.indirect(pos) if pos else 0

    def vector(self, table: int, slot: int) -> tuple[int, int]:
        """``(start, length)`` of a vector field; ``(0, 0)`` when absent."""
        pos = self.field(table, slot)
        if not pos:
            return 0, 0
        vec = self.indirect(pos)
        n = self._unpack("<I", vec)
        if vec + 4 + n > self.size:  # every element is at least one byte
            raise MalformedFlatbuffer(f"vector of {n} elements runs past the end")
        return vec + 4, n

    def numbers(self, table: int, slot: int, fmt: str) -> tuple[float | int, ...]:
        start, n = self.vector(table, slot)
        width = struct.calcsize(fmt)
        if start + n * width > self.size:
            raise MalformedFlatbuffer("vector runs past the end")
        return tuple(struct.unpack_from(f"<{n}{fmt}", self.buf, start)) if n else ()

    def tables(self, table: int, slot: int) -> list[int]:
        start, n = self.vector(table, slot)
        return [self.indirect(start + 4 * i) for i in range(n)]

    def string(self, table: int, slot: int) -> str:
        pos = self.field(table, slot)
        if not pos:
            return ""
        s = self.indirect(pos)
        n = self._unpack("<I", s)
        if s + 4 + n > self.size:
            raise MalformedFlatbuffer("string runs past the end")
        return bytes(self.buf[s + 4 : s + 4 + n]).decode("utf-8", errors="replace")


def _tensor(r: _Reader, t: int) -> TfliteTensor:
    quant = r.table(t, _TENSOR_QUANT)
    scales = r.numbers(quant, _QUANT_SCALE, "f") if quant else ()
    zeros = r.numbers(quant, _QUANT_ZERO, "q") if quant else ()
    return TfliteTensor(
        name=r.string(t, _TENSOR_NAME),
        type=r.scalar(t, _TENSOR_TYPE, "<b"),
        shape=tuple(int(d) for d in r.numbers(t, _TENSOR_SHAPE, "i")),
        shape_signature=tuple(int(d) for d in r.numbers(t, _TENSOR_SIGNATURE, "i")),
        scales=tuple(float(s) for s in scales),
        zero_points=tuple(int(z) for z in zeros),
    )


def _pick(tensors: list[TfliteTensor], index: int) -> TfliteTensor:
    if not 0 <= index < len(tensors):
        raise MalformedFlatbuffer(f"tensor index {index} out of range ({len(tensors)} tensors)")
    return tensors[index]


def parse_model(data: Buffer) -> TfliteModel:
    """Read the serving signature (``serving_default``, else the first; else subgraph 0's I/O)."""
    if bytes(data[4:8]) != IDENTIFIER:
        raise MalformedFlatbuffer("no 'TFL3' identifier at bytes 4..8")
    r = _Reader(data)
    model = r.root()
    custom = frozenset(
        name for op in r.tables(model, _MODEL_OPCODES) if (name := r.string(op, _OPCODE_CUSTOM))
    )
    subgraphs = r.tables(model, _MODEL_SUBGRAPHS)
    if not subgraphs:
        raise MalformedFlatbuffer("the model has no subgraph")
    sigs = r.tables(model, _MODEL_SIGNATURES)
    keyed = {r.string(s, _SIG_KEY): s for s in sigs}
    sig = keyed.get("serving_default", sigs[0] if sigs else 0)
    sub_index = r.scalar(sig, _SIG_SUBGRAPH, "<I") if sig else 0
    if sub_index >= len(subgraphs):
        raise MalformedFlatbuffer(f"signature names subgraph {sub_index} of {len(subgraphs)}")
    sub = subgraphs[sub_index]
    all_tensors = [_tensor(r, t) for t in r.tables(sub, _SUBGRAPH_TENSORS)]
    if sig:
        # LiteRT keeps signature tensors in a std::map, so its runner lists them by name.
        def mapped(slot: int) -> tuple[tuple[str, TfliteTensor], ...]:
            pairs = [(r.string(m, _MAP_NAME), r.scalar(m, _MAP_INDEX, "<I")) for m in r.tables(sig, slot)]
            return tuple((name, _pick(all_tensors, i)) for name, i in sorted(pairs))

        ins, outs = mapped(_SIG_INPUTS), mapped(_SIG_OUTPUTS)
        if ins and outs:
            return TfliteModel(ins, outs, tuple(all_tensors), custom, True)

    def listed(slot: int) -> tuple[tuple[str, TfliteTensor], ...]:
        tensors = [_pick(all_tensors, int(i)) for i in r.numbers(sub, slot, "i")]
        return tuple((t.name, t) for t in tensors)

    ins, outs = listed(_SUBGRAPH_INPUTS), listed(_SUBGRAPH_OUTPUTS)
    return TfliteModel(ins, outs, tuple(all_tensors), custom, False)
