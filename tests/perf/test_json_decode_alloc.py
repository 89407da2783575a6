"""Regression guard for the JSON tensor path: bytes allocated per decoded request, not time.

A 1.6 MB MobileNetV2 OIP JSON request (1x3x224x224 FP32, as tritonclient/orjson write it) must decode
without materialising Python numbers. tracemalloc sees every Python and numpy allocation (not
simdjson's own C++ buffers, which live only during the parse). Measured 2026-12 on the simdjson
path: peak 1.10x the body (a float64 buffer, then the float32 tensor). The orjson + ``np.array``
path it replaced peaks at 14.9x: 150,528 Python floats and their list. The bound below sits between,
with room for numpy or Python versions allocating a little differently, and does not depend on how
fast the machine is.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import orjson
import pytest

from edgert.serve import json_tensors, oip_codec

#: Peak traced bytes while decoding one request, as a multiple of the request body (measured: 1.10).
MAX_PEAK_PER_BODY = 2.0


def _mobilenet_body() -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    doc = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel()}]}
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY), x


def _peak_ratio(body: bytes) -> float:
    oip_codec.decode_infer_request(body)  # warm caches and imports outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        decoded = oip_codec.decode_infer_request(body)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.inputs["input"].shape == (1, 3, 224, 224)
    return peak / len(body)


def test_the_fast_json_parser_is_installed() -> None:
    assert json_tensors.available(), "pysimdjson is missing: install edgert[fast] (or [dev])"


def test_decoding_a_large_json_tensor_allocates_about_the_tensor_not_python_floats() -> None:
    body, x = _mobilenet_body()
    assert 1_500_000 < len(body) < 1_800_000  # the 1.6 MB request of issue 10
    ratio = _peak_ratio(body)
    assert ratio <= MAX_PEAK_PER_BODY, (
        f"decoding a {len(body)}-byte JSON request peaked at {ratio:.2f}x its size "
        f"(bound {MAX_PEAK_PER_BODY}x): is the simdjson path (serve/json_tensors.py) bypassed?"
    )
    assert np.array_equal(oip_codec.decode_infer_request(body).inputs["input"], x)


def test_the_guard_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without simdjson (the generic path) the same request must break the bound by far."""
    body, _ = _mobilenet_body()
    monkeypatch.setattr(json_tensors, "simdjson", None)
    assert _peak_ratio(body) > 3 * MAX_PEAK_PER_BODY
