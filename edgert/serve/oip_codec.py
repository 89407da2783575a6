"""Open Inference Protocol v2 codec: JSON tensors and the binary tensor data extension (pure logic).

Takes bytes and returns numpy arrays, or takes arrays and returns bytes. No sockets here. Sizes are
validated against the body before anything is allocated, so a request declaring a huge shape
costs nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgert.errors import InputError
from edgert.serve import json_tensors
from edgert.serve.json_tensors import PackedData

try:  # orjson is in the `fast` extra; the stdlib is the fallback
    import orjson

    def json_loads(data: bytes | bytearray | memoryview | str) -> Any:
        """Parse JSON (orjson when installed)."""
        return orjson.loads(data)

    def json_dumps(obj: Any) -> bytes:
        """Serialise to compact JSON bytes (orjson when installed; numpy arrays allowed)."""
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

except ImportError:  # pragma: no cover - exercised only without the fast extra

    def json_loads(data: bytes | bytearray | memoryview | str) -> Any:
        """Parse JSON (stdlib); nesting bombs become ValueError like orjson's depth limit."""
        if isinstance(data, memoryview):
            data = data.tobytes()
        try:
            return json.loads(data)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None

    def json_dumps(obj: Any) -> bytes:
        """Serialise to compact JSON bytes (stdlib)."""
        return json.dumps(obj, separators=(",", ":"), default=_np_default).encode()


def _np_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


__all__ = [
    "DATATYPES",
    "InferRequest",
    "OutputRequest",
    "datatype_of",
    "decode_infer_request",
    "encode_infer_response",
    "json_dumps",
    "json_loads",
    "parse_header_length",
    "representable_shape",
    "tensor_metadata",
]

#: OIP datatype -> numpy dtype. BYTES is refused on purpose (no model here takes strings).
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
_BY_DTYPE = {dt: name for name, dt in DATATYPES.items()}
#: Most tensors one request may carry (guards the per-input loop).
MAX_TENSORS = 64
#: Most dimensions per tensor.
MAX_RANK = 16
#: Largest nominal byte size of a shape (zero dimensions counted as one). numpy refuses shapes
#: whose non-zero dimensions multiply past the address space, even for an empty tensor.
MAX_NOMINAL_BYTES = 1 << 62


def datatype_of(dtype: Any) -> str:
    """The OIP datatype name of a numpy dtype (raises InputError for unsupported ones)."""
    try:
        return _BY_DTYPE[np.dtype(dtype)]
    except (KeyError, TypeError):
        raise InputError(f"dtype {dtype} has no OIP v2 datatype") from None


@dataclass(frozen=True)
class OutputRequest:
    """One requested output and whether it goes back as raw bytes."""

    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded OIP infer request."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    outputs: list[OutputRequest] | None = None
    binary_output_default: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def output_names(self) -> list[str] | None:
        """The requested output names, or None for all."""
        return None if self.outputs is None else [o.name for o in self.outputs]


def _bad(message: str, hint: str | None = None) -> InputError:
    return InputError(message, hint=hint)


def _shape(spec: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise _bad(f"input {name!r}: 'shape' must be a list of at most {MAX_RANK} integers, got {shape!r}")
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise _bad(f"input {name!r}: shape {shape} must hold non-negative integers")
    return tuple(shape)


def representable_shape(shape: tuple[int, ...], dtype: np.dtype[Any], name: str) -> None:
    """Raise InputError when no array can have ``shape`` (e.g. ``[0, 2**62, 2**62]``)."""
    nominal = dtype.itemsize
    for dim in shape:
        nominal *= max(dim, 1)
        if nominal > MAX_NOMINAL_BYTES:
            raise _bad(
                f"input {name!r}: shape {list(shape)} is too large to represent",
                hint="dimensions must multiply to a size that fits in memory",
            )


def parse_header_length(value: str) -> int:
    """The Inference-Header-Content-Length value as an int; InputError unless ASCII decimal digits."""
    if not (value.isascii() and value.isdigit() and len(value) <= 19):
        raise _bad(
            f"Inference-Header-Content-Length must be a decimal byte count, got {value[:40]!r}",
            hint="send the JSON header's length in bytes, e.g. Inference-Header-Content-Length: 184",
        )
    return int(value)


def _element_count(
    shape: tuple[int, ...], limit: int, name: str, carried: str = "the request carries"
) -> int:
    """Product of dims, refusing early (without overflow) once it passes ``limit``."""
    count = 1
    for dim in shape:
        count *= dim
        if count > limit:
            raise _bad(f"input {name!r}: shape {list(shape)} declares more data than {carried}")
    return count


def _params(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(f"{where}: 'parameters' must be an object")
    return params


def _decode_json_data(
    data: Any, dtype: np.dtype[Any], shape: tuple[int, ...], count: int, name: str
) -> np.ndarray:
    if isinstance(data, PackedData):
        return _decode_packed(data.values, dtype, shape, count, name)
    if not isinstance(data, list):
        raise _bad(f"input {name!r}: 'data' must be a JSON array")
    if data and not isinstance(data[0], list) and len(data) != count:
        raise _bad(f"input {name!r}: 'data' has {len(data)} elements but shape {list(shape)} needs {count}")
    try:
        arr = np.array(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError):
        raise _bad(
            f"input {name!r}: 'data' does not hold {datatype_of(dtype)} values (or is ragged)",
            hint="send a flat list of numbers in row-major order",
        ) from None
    if arr.size != count:
        raise _bad(f"input {name!r}: 'data' has {arr.size} elements but shape {list(shape)} needs {count}")
    return arr.reshape(shape)


def _decode_packed(
    values: np.ndarray, dtype: np.dtype[Any], shape: tuple[int, ...], count: int, name: str
) -> np.ndarray:
    """Flat numbers already in a C buffer: the same checks and messages as the list path."""
    if values.size != count:
        raise _bad(f"input {name!r}: 'data' has {values.size} elements but shape {list(shape)} needs {count}")
    if dtype.kind in "iu" and values.size:
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:  # np.array raises OverflowError here
            raise _bad(
                f"input {name!r}: 'data' does not hold {datatype_of(dtype)} values (or is ragged)",
                hint="send a flat list of numbers in row-major order",
            )
    return values.astype(dtype).reshape(shape)


def _parse_header(view: memoryview, header_length: int) -> Any:
    """The JSON document: simdjson for a large all-JSON body (numeric data packed), else orjson/json."""
    if header_length == len(view) and header_length >= json_tensors.MIN_BYTES and json_tensors.available():
        obj = view.obj  # the body itself when it is bytes: no copy
        doc = json_tensors.parse_request(
            obj if isinstance(obj, bytes) and len(obj) == len(view) else bytes(view)
        )
        if doc is not None:
            return doc
    try:
        return json_loads(view[:header_length])
    except (ValueError, TypeError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None


def decode_infer_request(
    body: bytes | bytearray | memoryview, header_length: int | None = None
) -> InferRequest:
    """Decode an infer request body; ``header_length`` is the Inference-Header-Content-Length value."""
    view = memoryview(body)
    if header_length is None:
        header_length = len(view)
    if not 0 <= header_length <= len(view):
        raise _bad(
            f"Inference-Header-Content-Length {header_length} is larger than the {len(view)}-byte body"
        )
    doc = _parse_header(view, header_length)
    if not isinstance(doc, dict):
        raise _bad("request body must be a JSON object with an 'inputs' list")
    binary = view[header_length:]
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_TENSORS:
        raise _bad(f"'inputs' must be a list of 1..{MAX_TENSORS} tensors")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for spec in inputs:
        arr, used = _decode_input(spec, binary, offset, len(view))
        arrays[spec["name"]] = arr
        offset += used
    if offset != len(binary):
        raise _bad(
            f"binary data is {len(binary)} bytes but the inputs' binary_data_size add up to {offset}",
            hint="each binary input needs parameters.binary_data_size equal to its byte length",
        )
    req_id = doc.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise _bad("'id' must be a string")
    params = _params(doc, "request")
    return InferRequest(
        inputs=arrays,
        id=req_id,
        outputs=_decode_outputs(doc.get("outputs"), bool(params.get("binary_data_output", False))),
        binary_output_default=bool(params.get("binary_data_output", False)),
        parameters=params,
    )


def _decode_input(spec: Any, binary: memoryview, offset: int, body_len: int) -> tuple[np.ndarray, int]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise _bad("each input must be an object with a string 'name'")
    name = spec["name"]
    datatype = spec.get("datatype")
    if datatype == "BYTES":
        raise _bad(f"input {name!r}: datatype BYTES is not supported", hint="send numeric tensors")
    dtype = DATATYPES.get(datatype) if isinstance(datatype, str) else None
    if dtype is None:
        raise _bad(f"input {name!r}: unknown datatype {datatype!r} (allowed: {', '.join(DATATYPES)})")
    shape = _shape(spec, name)
    params = _params(spec, f"input {name!r}")
    size = params.get("binary_data_size")
    if size is None:
        # A JSON number takes at least one byte of body, so the body length bounds the element count.
        count = _element_count(shape, body_len, name)
        representable_shape(shape, dtype, name)  # an empty tensor's other dims are unbounded so far
        return _decode_json_data(spec.get("data"), dtype, shape, count, name), 0
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _bad(f"input {name!r}: binary_data_size must be a non-negative integer")
    count = _element_count(
        shape, len(binary) // dtype.itemsize, name, f"the {len(binary)} bytes of binary data carry"
    )
    representable_shape(shape, dtype, name)
    if count * dtype.itemsize != size:
        raise _bad(
            f"input {name!r}: binary_data_size {size} does not match shape {list(shape)} of {datatype} "
            f"({count * dtype.itemsize} bytes)"
        )
    if offset + size > len(binary):
        raise _bad(f"input {name!r}: binary_data_size {size} runs past the end of the body")
    arr = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
    return arr, size


def _decode_outputs(outputs: Any, default_binary: bool) -> list[OutputRequest] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise _bad("'outputs' must be a list of {\"name\": ...} objects")
    result = []
    for out in outputs:
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise _bad("each requested output must be an object with a string 'name'")
        params = _params(out, f"output {out['name']!r}")
        result.append(OutputRequest(out["name"], bool(params.get("binary_data", default_binary))))
    return result


def _json_data(arr: np.ndarray) -> Any:
    flat = np.ascontiguousarray(arr).reshape(-1)
    if flat.dtype == np.float16:  # orjson cannot serialise float16
        return flat.astype(np.float32)
    return flat


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: Mapping[str, np.ndarray],
    *,
    request_id: str | None = None,
    requested: Sequence[OutputRequest] | None = None,
    binary_default: bool = False,
    parameters: Mapping[str, Any] | None = None,
) -> tuple[bytes, list[bytes | memoryview], int | None]:
    """Encode a response: (JSON header, binary chunks, header length or None when all-JSON)."""
    binary_flags = {o.name: o.binary for o in requested} if requested is not None else {}
    entries = []
    chunks: list[bytes | memoryview] = []
    for name, arr in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if binary_flags.get(name, binary_default):
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data
            entry["parameters"] = {"binary_data_size": raw.nbytes}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(arr)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id is not None:
        doc["id"] = request_id
    if parameters:
        doc["parameters"] = dict(parameters)
    header = json_dumps(doc)
    return header, chunks, (len(header) if chunks else None)


def tensor_metadata(name: str, dtype: Any, shape: Sequence[int | None]) -> dict[str, Any]:
    """OIP tensor metadata; dynamic dimensions are -1."""
    return {
        "name": name,
        "datatype": datatype_of(dtype),
        "shape": [-1 if d is None else int(d) for d in shape],
    }


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf: map them to null."""
    return value if math.isfinite(value) else None
