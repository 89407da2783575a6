"""Binary framing of the Unix-socket fast path (pure logic, shared by server and client).

A frame is a 12-byte header, a small JSON meta document, then raw tensor bytes::

    header  = <u32 body_length> <u8 kind> <u8 flags> <u16 reserved> <u32 meta_length>   (little endian)
    body    = meta (JSON, UTF-8) | zero padding to 8 | tensor 0 | pad to 8 | tensor 1 | ...

``body_length`` counts everything after the header. Tensors are described in the meta as
``[name, OIP datatype, shape]`` in order, so their byte lengths follow from dtype and shape and
arrays are views into the received buffer (no copy). Responses reuse the request's framing with
kind OK or ERROR.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgert.errors import InputError
from edgert.serve.oip_codec import (
    DATATYPES,
    MAX_RANK,
    MAX_TENSORS,
    datatype_of,
    json_dumps,
    json_loads,
    representable_shape,
)

__all__ = [
    "ERROR",
    "HEADER",
    "INFER",
    "LOAD",
    "META",
    "OK",
    "READY",
    "STATUS",
    "UNLOAD",
    "FrameError",
    "decode_body",
    "decode_tensors",
    "encode_frame",
    "parse_header",
]

HEADER = struct.Struct("<IBBHI")
ALIGN = 8

# request kinds
INFER, META, READY, STATUS, LOAD, UNLOAD, LIST = 1, 2, 3, 4, 5, 6, 7
# response kinds
OK, ERROR = 0x80, 0x81
# stream kinds (docs/streams.md): client OPEN/PUSH/CLOSE, server RESULT/END (plus OK and ERROR)
STREAM_OPEN, STREAM_PUSH, STREAM_CLOSE, STREAM_RESULT, STREAM_END = 8, 9, 10, 0x82, 0x83
STREAM_KINDS = frozenset({STREAM_OPEN, STREAM_PUSH, STREAM_CLOSE, STREAM_RESULT, STREAM_END})
KINDS = frozenset({INFER, META, READY, STATUS, LOAD, UNLOAD, LIST, OK, ERROR}) | STREAM_KINDS


class FrameError(InputError):
    """A frame is malformed; the stream cannot be trusted any more."""


def _pad(n: int) -> int:
    return -n % ALIGN


def encode_frame(
    kind: int, meta: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None
) -> list[Any]:
    """Frame ``meta`` plus ``tensors`` (described into meta['t']) as buffers for writelines/sendmsg."""
    doc = dict(meta)
    buffers: list[Any] = []
    if tensors:
        doc["t"] = [[name, datatype_of(a.dtype), list(a.shape)] for name, a in tensors.items()]
    meta_bytes = json_dumps(doc)
    pos = len(meta_bytes)
    buffers.append(meta_bytes)
    for arr in (tensors or {}).values():
        pad = _pad(pos)
        if pad:
            buffers.append(b"\0" * pad)
        raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
        buffers.append(raw)
        pos += pad + raw.nbytes
    head = HEADER.pack(pos, kind, 0, 0, len(meta_bytes))
    return [head, *buffers]


def parse_header(data: bytes | bytearray | memoryview, max_body: int) -> tuple[int, int, int]:
    """(body_length, kind, meta_length) from 12 header bytes; raises FrameError on nonsense."""
    body_len, kind, _flags, _reserved, meta_len = HEADER.unpack_from(data)
    if kind not in KINDS:
        raise FrameError(f"unknown frame kind {kind}; is the client speaking the edgert socket protocol?")
    if body_len > max_body:
        raise FrameError(f"frame of {body_len} bytes exceeds the {max_body}-byte limit")
    if meta_len > body_len:
        raise FrameError(f"meta length {meta_len} is larger than the {body_len}-byte frame")
    return body_len, kind, meta_len


def decode_body(body: bytes | bytearray | memoryview, meta_len: int) -> tuple[dict[str, Any], memoryview]:
    """Split a body into its meta document and the tensor data region."""
    view = memoryview(body)
    try:
        meta = json_loads(view[:meta_len])
    except ValueError as exc:
        raise InputError(f"frame meta is not valid JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise InputError("frame meta must be a JSON object")
    return meta, view[meta_len:]


def decode_tensors(meta: Mapping[str, Any], data: memoryview, meta_len: int) -> dict[str, np.ndarray]:
    """Arrays described by meta['t'], as read-only views into ``data`` (sizes checked first)."""
    specs = meta.get("t") or []
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise InputError(f"'t' must be a list of at most {MAX_TENSORS} tensor descriptions")
    arrays: dict[str, np.ndarray] = {}
    pos = meta_len  # alignment is relative to the body start
    offset = 0
    for spec in specs:
        name, dtype, shape = _tensor_spec(spec)
        pad = _pad(pos)
        offset += pad
        pos += pad
        count = 1
        for dim in shape:
            count *= dim
            if count * dtype.itemsize > len(data) - offset:
                raise InputError(f"tensor {name!r} with shape {list(shape)} runs past the end of the frame")
        representable_shape(shape, dtype, name)  # an empty tensor's other dims are unbounded so far
        nbytes = count * dtype.itemsize
        if nbytes > len(data) - offset:
            raise InputError(f"tensor {name!r} with shape {list(shape)} runs past the end of the frame")
        arrays[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += nbytes
        pos += nbytes
    if offset != len(data):
        raise InputError(f"frame carries {len(data) - offset} bytes beyond the described tensors")
    return arrays


def _tensor_spec(spec: Any) -> tuple[str, np.dtype[Any], tuple[int, ...]]:
    if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)):
        raise InputError("each tensor description must be [name, datatype, shape]")
    name, datatype, shape = spec
    if datatype == "BYTES":
        raise InputError(f"tensor {name!r}: datatype BYTES is not supported")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise InputError(f"tensor {name!r}: unknown datatype {datatype!r} (allowed: {', '.join(DATATYPES)})")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise InputError(f"tensor {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    return name, dtype, tuple(shape)
