"""A minimal, read-only walk of an ONNX ``ModelProto``: graph inputs/outputs, node types, initializer types.

Why not the ``onnx`` package: it is about 30 MB installed plus protobuf, only to read a few
fields, and onnxruntime (which edgert needs anyway) does not expose whether an input has a
shape at all (it reports ``[]`` for both a scalar and an input of unknown rank). This walker reads
just the fields named below, skips everything else by length (initializer data is never
copied), and raises :class:`MalformedProto` on anything that is not well-formed protobuf.

Field numbers are those of onnx/onnx.proto (ModelProto, GraphProto, NodeProto, TensorProto,
ValueInfoProto, TypeProto, TensorShapeProto). Nodes inside control-flow subgraphs (If/Loop
bodies) and functions are not visited.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["MalformedProto", "OnnxGraph", "OnnxValue", "looks_like_model", "parse_model"]

Buffer = bytes | bytearray | memoryview

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5

#: ModelProto fields and their wire types (onnx.proto as of onnx 1.23): used to recognise a model.
MODEL_FIELDS = {1: _VARINT, 2: _LEN, 3: _LEN, 4: _LEN, 5: _VARINT, 6: _LEN, 7: _LEN, 8: _LEN, 14: _LEN,
                20: _LEN, 25: _LEN, 26: _LEN}
_GRAPH = 7
#: Sniffing stops after this many top-level fields (a real ModelProto has a few dozen), so a
#: crafted file of millions of tiny fields cannot stall it; such a file counts as ambiguous.
MAX_SNIFF_FIELDS = 10_000


class MalformedProto(ValueError):
    """The bytes are not a well-formed protobuf message of the expected shape."""


@dataclass(frozen=True)
class OnnxValue:
    """A graph input or output: ``elem_type`` is TensorProto.DataType (0 for non-tensor types).

    ``dims`` is None when the value has no shape at all (unknown rank); a dim is None when it is
    symbolic (``dim_param``), unset or negative.
    """

    name: str
    elem_type: int
    dims: tuple[int | None, ...] | None


@dataclass(frozen=True)
class OnnxGraph:
    """What edgert reads from a model: I/O, ``(domain, op_type)`` of top-level nodes, initializer types."""

    ir_version: int
    inputs: tuple[OnnxValue, ...]
    outputs: tuple[OnnxValue, ...]
    op_types: frozenset[tuple[str, str]]
    initializer_types: frozenset[int]


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise MalformedProto("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise MalformedProto("varint longer than 10 bytes")


def _fields(buf: Buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field, wire_type, a, b)``: a varint/fixed value in ``a``, or a payload ``buf[a:b]``."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise MalformedProto("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value, pos
        elif wire == _LEN:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise MalformedProto(f"field {field} runs past the end of its message")
            yield field, wire, pos, pos + size
            pos += size
        elif wire in (_I64, _I32):
            width = 8 if wire == _I64 else 4
            if pos + width > end:
                raise MalformedProto("truncated fixed-width field")
            yield field, wire, pos, pos + width
            pos += width
        else:
            raise MalformedProto(f"unsupported wire type {wire}")


def _expect(field: int, wire: int, want: int) -> None:
    if wire != want:
        raise MalformedProto(f"field {field} has wire type {wire}, expected {want}")


def _text(buf: Buffer, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _dims(buf: Buffer, start: int, end: int) -> tuple[int | None, ...]:
    dims: list[int | None] = []
    for f, w, a, b in _fields(buf, start, end):
        if f != 1:  # TensorShapeProto.dim
            continue
        _expect(f, w, _LEN)
        value: int | None = None
        for df, dw, da, _ in _fields(buf, a, b):
            if df == 1 and dw == _VARINT:  # dim_value; dim_param (2) stays None
                value = _int64(da)
        dims.append(value if value is not None and value >= 0 else None)
    return tuple(dims)


def _value_info(buf: Buffer, start: int, end: int) -> OnnxValue:
    name, elem, dims = "", 0, None
    for f, w, a, b in _fields(buf, start, end):
        if f == 1:
            _expect(f, w, _LEN)
            name = _text(buf, a, b)
        elif f == 2:  # TypeProto
            _expect(f, w, _LEN)
            for tf, tw, ta, tb in _fields(buf, a, b):
                if tf != 1:  # tensor_type; sequence/map/optional types stay elem_type 0
                    continue
                _expect(tf, tw, _LEN)
                for sf, sw, sa, sb in _fields(buf, ta, tb):
                    if sf == 1 and sw == _VARINT:
                        elem = sa
                    elif sf == 2 and sw == _LEN:  # shape present: rank known (possibly 0)
                        dims = _dims(buf, sa, sb)
    return OnnxValue(name, elem, dims)


def _node(buf: Buffer, start: int, end: int) -> tuple[str, str]:
    op_type = domain = ""
    for f, w, a, b in _fields(buf, start, end):
        if f == 4 and w == _LEN:
            op_type = _text(buf, a, b)
        elif f == 7 and w == _LEN:
            domain = _text(buf, a, b)
    return domain, op_type


def _tensor(buf: Buffer, start: int, end: int) -> tuple[str, int]:
    name, dtype = "", 0
    for f, w, a, b in _fields(buf, start, end):
        if f == 2 and w == _VARINT:
            dtype = a
        elif f == 8 and w == _LEN:
            name = _text(buf, a, b)
    return name, dtype


def looks_like_model(data: bytes | bytearray | memoryview) -> bool | None:
    """True if ``data`` is a whole, well-formed ModelProto with a graph; None if it starts like
    one (its first field is a ModelProto field) but is truncated or damaged further on; False
    if it does not start like a ModelProto at all."""
    seen_graph = False
    count = 0
    try:
        for f, w, _a, _b in _fields(data, 0, len(data)):
            want = MODEL_FIELDS.get(f)
            if count == 0 and want != w:
                return False
            if want is not None and w != want:
                return None
            seen_graph = seen_graph or f == _GRAPH
            count += 1
            if count >= MAX_SNIFF_FIELDS:
                return None
    except MalformedProto:
        return None if count else False
    return True if seen_graph else (None if count else False)


def parse_model(data: Buffer) -> OnnxGraph:
    """Read a ModelProto's graph I/O, node types and initializer types; raises MalformedProto."""
    ir_version = 0
    graph: tuple[int, int] | None = None
    for f, w, a, b in _fields(data, 0, len(data)):
        if f == 1 and w == _VARINT:
            ir_version = a
        elif f == _GRAPH:
            _expect(f, w, _LEN)
            graph = (a, b)
    if graph is None:
        raise MalformedProto("the model has no graph")
    inputs: list[OnnxValue] = []
    outputs: list[OnnxValue] = []
    ops: set[tuple[str, str]] = set()
    init_names: set[str] = set()
    init_types: set[int] = set()
    for f, w, a, b in _fields(data, *graph):
        if w != _LEN:
            continue
        if f == 1:
            ops.add(_node(data, a, b))
        elif f == 5:
            name, dtype = _tensor(data, a, b)
            init_names.add(name)
            init_types.add(dtype)
        elif f == 15:  # SparseTensorProto: values (1) is a TensorProto
            for sf, sw, sa, sb in _fields(data, a, b):
                if sf == 1 and sw == _LEN:
                    name, dtype = _tensor(data, sa, sb)
                    init_names.add(name)
                    init_types.add(dtype)
        elif f == 11:
            inputs.append(_value_info(data, a, b))
        elif f == 12:
            outputs.append(_value_info(data, a, b))
    # From IR version 4 an input that has an initializer is an overridable constant, which
    # onnxruntime does not list among the inputs a caller must feed.
    if ir_version >= 4:
        inputs = [v for v in inputs if v.name not in init_names]
    return OnnxGraph(ir_version, tuple(inputs), tuple(outputs), frozenset(ops), frozenset(init_types))
