"""Large OIP JSON bodies parsed with simdjson: numeric ``data`` arrays go straight into numpy buffers.

Why: ``orjson.loads`` turns a 1.6 MB MobileNetV2 request into 150,528 Python floats and ``np.array``
then walks them again; together that was 10 ms of a 15 ms request. ``pysimdjson`` (the ``fast``
extra) parses the same body in about 3 ms, and ``Array.as_buffer`` copies a numeric array into a
C buffer without creating a single Python number.

This module only *parses*; every check and every error message stays in :mod:`oip_codec`. Whatever
simdjson cannot hand over exactly as the generic path would (invalid JSON, ragged or mixed nesting,
booleans or strings among the numbers, integers out of the buffer's range) is returned as plain
Python lists, or not parsed at all (``None``), so the generic path decides and words the error.
Pure logic: bytes in, Python objects and numpy arrays out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

try:  # pysimdjson is in the `fast` extra; without it every body goes through orjson / json
    import simdjson
except ImportError:  # pragma: no cover - exercised only without the fast extra
    simdjson = None  # type: ignore[assignment]

__all__ = ["MIN_BYTES", "PackedData", "available", "parse_request"]

#: Bodies smaller than this go to the generic parser: orjson is as fast there and builds no proxies.
MIN_BYTES = 64 * 1024
#: OIP datatype -> pysimdjson ``as_buffer`` type ('d' double, 'i' int64, 'u' uint64). BOOL is absent.
_BUFFER_TYPES = {
    "FP16": "d",
    "FP32": "d",
    "FP64": "d",
    "INT8": "i",
    "INT16": "i",
    "INT32": "i",
    "INT64": "i",
    "UINT8": "i",
    "UINT16": "i",
    "UINT32": "i",
    "UINT64": "u",
}
_NUMPY_TYPES = {"d": np.float64, "i": np.int64, "u": np.uint64}


@dataclass(frozen=True)
class PackedData:
    """A flat JSON array of numbers, already in a 1-D float64/int64/uint64 array (no Python numbers)."""

    values: np.ndarray


def available() -> bool:
    """True when pysimdjson is installed."""
    return simdjson is not None


def parse_request(body: bytes) -> dict[str, Any] | None:
    """Parse an all-JSON infer body; inputs' flat numeric ``data`` come back as :class:`PackedData`.

    Returns None when simdjson is missing or refuses the body (the caller's generic parser then
    produces the error). A fresh parser per call: reusing one keeps buffers sized to the largest
    body ever seen, and costs no measurable time less.
    """
    if simdjson is None:
        return None
    parser = simdjson.Parser()
    try:
        doc = parser.parse(body)
    except (ValueError, TypeError, RuntimeError):
        return None
    if not isinstance(doc, simdjson.Object):
        return None
    pending: list[tuple[dict[str, Any], Any]] = []
    try:
        light = _light_doc(doc, pending)
    except _Duplicate:
        return None
    nests = [_regular_nest(data) for _, data in pending]
    expected = _count_lists(light) + sum(_arrays_in(dims) if dims else 1 for dims in nests)
    plain = _count_brackets(body, expected) == expected
    for (spec, data), dims in zip(pending, nests, strict=True):
        spec["data"] = _data(data, spec.get("datatype"), plain and dims is not None)
    return light


def _regular_nest(array: Any) -> tuple[int, ...] | None:
    """The dims of a regular nest of arrays (every array at a level has the same length), or None.

    Only the arrays are checked, not what the innermost ones hold: a number beside rows, or an array
    among the innermost numbers, adds or removes a '[' against :func:`_arrays_in`, which the caller's
    bracket count catches. Walks the arrays above the innermost level (676 for 1x3x224x224), never
    the numbers.
    """
    dims: list[int] = []
    first = array
    while isinstance(first, simdjson.Array):
        dims.append(len(first))
        if not dims[-1]:
            break
        first = first[0]
    level = [array]
    for depth, size in enumerate(dims[:-1]):
        below: list[Any] = []
        for a in level:
            if not isinstance(a, simdjson.Array) or len(a) != size:
                return None
            below.extend(a)
        level = below
        if depth == len(dims) - 2 and any(
            not isinstance(a, simdjson.Array) or len(a) != dims[-1] for a in level
        ):
            return None
    return tuple(dims)


def _arrays_in(dims: tuple[int, ...]) -> int:
    """How many arrays (one '[' each) a regular nest of ``dims`` holds: 1 + d0 + d0*d1 + ..."""
    total, width = 0, 1
    for size in dims:
        total += width
        width *= size
    return total


def _light_doc(doc: Any, pending: list[tuple[dict[str, Any], Any]]) -> dict[str, Any]:
    """The document as Python objects, except each input's array ``data`` (left in ``pending``)."""
    light = {key: (_input_list(doc[key]) if key == "inputs" else _py(doc[key])) for key in _keys(doc)}
    inputs = light.get("inputs")
    if isinstance(inputs, list):
        for spec in inputs:
            if isinstance(spec, dict) and isinstance(spec.get("data"), simdjson.Array):
                pending.append((spec, spec["data"]))
    return light


def _input_list(value: Any) -> Any:
    if not isinstance(value, simdjson.Array):
        return _py(value)
    specs: list[Any] = []
    for item in value:
        if isinstance(item, simdjson.Object):
            # `data` stays a proxy (no Python numbers); the caller resolves it.
            specs.append({k: (item[k] if k == "data" else _py(item[k])) for k in _keys(item)})
        else:
            specs.append(_py(item))
    return specs


def _keys(obj: Any) -> list[str]:
    """An object's keys; duplicates raise _Duplicate (lookups return the first, orjson keeps the last)."""
    keys = list(obj)
    if len(set(keys)) != len(keys):
        raise _Duplicate
    return keys


class _Duplicate(Exception):
    """A duplicate key: leave the whole body to the generic parser."""


def _py(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _count_lists(obj: Any) -> int:
    """Lists in a parsed (Python) document: each came from one '[' in the text."""
    if isinstance(obj, list):
        return 1 + sum(_count_lists(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_count_lists(x) for x in obj.values())
    return 0


def _count_brackets(body: bytes, limit: int) -> int:
    """How many b'[' the body holds, counting no further than ``limit + 1`` (memchr per hit)."""
    count, pos = 0, body.find(b"[")
    while pos >= 0 and count <= limit:
        count += 1
        pos = body.find(b"[", pos + 1)
    return count


def _data(array: Any, datatype: Any, flat: bool) -> PackedData | list[Any]:
    """One input's data: packed when provably flat and numeric; else plain Python lists.

    Numbers become doubles first and the tensor's dtype second, as ``np.array(list_of_floats)`` does
    (it rounds Python ints to float32 through a double as well), so both paths give the same bits.

    ``flat``: the body holds no '[' beyond the lists of the light document and those of each data
    array's regular nest, so ``as_buffer`` (which flattens nested arrays in row-major order) sees
    exactly the numbers ``np.array`` would (a '[' inside a string only makes this False, never True).
    """
    kind = _BUFFER_TYPES.get(datatype) if isinstance(datatype, str) else None
    if flat and kind is not None:
        try:
            values = np.frombuffer(array.as_buffer(of_type=kind), dtype=_NUMPY_TYPES[kind])
        except (TypeError, ValueError):  # a bool, string, null or object among the numbers; overflow
            values = None
        if values is not None:
            return PackedData(values)
    return list(array.as_list())
