"""The simdjson fast path decodes exactly what the generic path decodes, and fails with the same words."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest

from edgert.errors import InputError
from edgert.serve import json_tensors, oip_codec

pytestmark = pytest.mark.skipif(not json_tensors.available(), reason="pysimdjson (fast extra) not installed")


def _body(data: object, datatype: str = "FP32", shape: list[int] | None = None, name: str = "x") -> bytes:
    spec = {"name": name, "datatype": datatype, "shape": shape if shape is not None else [3], "data": data}
    return json.dumps({"inputs": [spec]}).encode()


def _outcome(body: bytes) -> tuple[str, object]:
    try:
        req = oip_codec.decode_infer_request(body)
    except InputError as exc:
        return "error", str(exc)
    return "ok", {k: (v.dtype.str, v.shape, v.tobytes()) for k, v in req.inputs.items()}


def _both(body: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[tuple[str, object], tuple[str, object]]:
    with monkeypatch.context() as m:
        m.setattr(json_tensors, "MIN_BYTES", 0)
        fast = _outcome(body)
    with monkeypatch.context() as m:
        m.setattr(json_tensors, "simdjson", None)
        generic = _outcome(body)
    return fast, generic


CASES = {
    "flat fp32": _body([0.1, -2.5, 3]),
    "nested": _body([[1, 2], [3, 4]], shape=[2, 2]),
    "nested singletons": _body([[1], [2], [3]]),
    "ragged": _body([[1, 2], [3]]),
    "mixed nesting": _body([[1], 2, 3]),
    "empty nested array": _body([[1, 2], [], 3]),
    "bool among floats": _body([1.0, True, 2.0]),
    "string among floats": _body([1.0, "2", 3.0]),
    "null among floats": _body([1.0, None, 3.0]),
    "object among floats": _body([1.0, {}, 3.0]),
    "too few": _body([1.0, 2.0]),
    "too many": _body([1.0, 2.0, 3.0, 4.0]),
    "empty for a non-empty shape": _body([]),
    "empty tensor": _body([], shape=[0, 3]),
    "int8 overflow": _body([1, 300, 2], "INT8"),
    "uint8 negative": _body([1, -1, 2], "UINT8"),
    "int8 ok": _body([-128, 0, 127], "INT8"),
    "uint32 max": _body([0, 1, 4294967295], "UINT32"),
    "uint64 top": _body([0, 1, 18446744073709551615], "UINT64"),
    "int64 beyond": _body([0, 1, 9223372036854775808], "INT64"),
    "float in int32": _body([1.5, 2, 3], "INT32"),
    "bool tensor": _body([True, False, 1], "BOOL"),
    "fp16": _body([0.1, 65504, 1e-7], "FP16"),
    "fp64": _body([0.1, 1e300, -5e-324], "FP64"),
    "big ints in fp32": _body([16777217, 9007199254740993, 2**60 + 2**36 + 1]),
    "negative zero": _body([-0.0, 0, -0]),
    "bracket in name": _body([1, 2, 3], name="x[0]"),
    "ragged with the right total": _body([[1, 2], [3], [4, 5, 6]], shape=[6]),
    "ragged rows, equal first rows": _body([[1, 2], [3, 4], [5]], shape=[5]),
    "deep regular nesting": _body([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], shape=[2, 2, 2]),
    "deep nesting for a flat shape": _body([[[1, 2], [3, 4]], [[5, 6], [7, 8]]], shape=[8]),
    "deep ragged": _body([[[1, 2], [3, 4]], [[5, 6], [7]]], shape=[7]),
    "leaf array in the last level": _body([[1, [2]], [3, 4]], shape=[4]),
    "number beside rows": _body([[1, 2], 3], shape=[3]),
    "empty rows": _body([[], []], shape=[2, 0]),
    "bool in a nested row": _body([[1.0, True], [2.0, 3.0]], shape=[2, 2]),
    "nested in a second input": json.dumps({"inputs": [
        {"name": "a", "datatype": "FP32", "shape": [2], "data": [1, 2]},
        {"name": "b", "datatype": "INT32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
    ]}).encode(),
    "data not a list": _body({"a": 1}),
    "duplicate data key": (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[3],"data":[1,2,3],"data":[4,5,6]}]}'
    ),
    "duplicate inputs key": b'{"inputs":[],"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}',
    "not json": b'{"inputs": [1, 2',
    "nesting bomb": b'{"inputs": ' + b"[" * 5000,
    "top level array": b"[1, 2, 3]",
    "unknown datatype": _body([1, 2, 3], "FP8"),
    "with outputs and params": json.dumps({
        "id": "r1", "parameters": {"binary_data_output": True, "tags": [["a"]]},
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": [1, 2, 3]}],
        "outputs": [{"name": "y"}],
    }).encode(),
}


@pytest.mark.parametrize("body", CASES.values(), ids=CASES.keys())
def test_fast_path_matches_generic_path(body: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    fast, generic = _both(body, monkeypatch)
    assert fast == generic


def test_float32_round_trips_bit_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    special = np.array(
        [0.0, -0.0, 1.0, -1.0, np.finfo(np.float32).max, np.finfo(np.float32).min,
         np.finfo(np.float32).tiny, np.finfo(np.float32).smallest_subnormal, 1e-45, 3.4028235e38],
        dtype=np.float32,
    )
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    x = np.concatenate([special, bits[np.isfinite(bits)], rng.standard_normal(50_000).astype(np.float32)])
    spec = {"name": "x", "datatype": "FP32", "shape": [x.size]}
    for encoded in (
        orjson.dumps({"inputs": [{**spec, "data": x}]}, option=orjson.OPT_SERIALIZE_NUMPY),
        json.dumps({"inputs": [{**spec, "data": x.tolist()}]}).encode(),
    ):
        assert len(encoded) > json_tensors.MIN_BYTES  # the fast path by default
        got = oip_codec.decode_infer_request(encoded).inputs["x"]
        assert got.dtype == np.float32
        assert got.view(np.uint32).tobytes() == x.view(np.uint32).tobytes()
        fast, generic = _both(encoded, monkeypatch)
        assert fast == generic


def test_large_body_takes_the_packed_path() -> None:
    x = np.arange(100_000, dtype=np.float32) / 7
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [x.size], "data": x}]},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    doc = json_tensors.parse_request(body)
    assert doc is not None
    assert isinstance(doc["inputs"][0]["data"], json_tensors.PackedData)


def test_large_nested_body_takes_the_packed_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested data (curl users, orjson's numpy output) is packed too, not walked as 150,528 Python floats."""
    x = np.random.default_rng(3).standard_normal((1, 3, 224, 224)).astype(np.float32)
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape), "data": x}]},
                        option=orjson.OPT_SERIALIZE_NUMPY)
    doc = json_tensors.parse_request(body)
    assert doc is not None
    assert isinstance(doc["inputs"][0]["data"], json_tensors.PackedData)
    got = oip_codec.decode_infer_request(body).inputs["x"]
    assert got.shape == x.shape and got.tobytes() == x.tobytes()
    fast, generic = _both(body, monkeypatch)
    assert fast == generic
