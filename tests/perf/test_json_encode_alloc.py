"""Regression guard for large JSON outputs: bytes allocated per encoded response, not time.

A 1x3x224x224 FP32 output (a segmentation map, an image-to-image model) encoded as OIP JSON must go from
the numpy array straight to JSON text (orjson's numpy serializer, float32 shortest reprs), never through
``tolist()``: 150,528 Python floats and their list are ~4.8 MB of objects before a byte of JSON exists.
tracemalloc sees every Python and numpy allocation; the bound does not depend on the machine's speed.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import orjson
import pytest

from edgert.serve import oip_codec

#: Peak traced bytes while encoding, as a multiple of the JSON produced. Measured 2026-12: 2.53 (the text,
#: plus orjson's growing output buffer); through ``tolist()`` 12.9 (and the text is longer: float64 reprs).
MAX_PEAK_PER_OUTPUT = 4.0


def _peak_ratio(x: np.ndarray) -> tuple[float, bytes]:
    oip_codec.encode_infer_response("m", "1", {"out": x})  # warm caches and imports outside the measurement
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        header, chunks, _ = oip_codec.encode_infer_response("m", "1", {"out": x})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert chunks == []  # all-JSON: the data is inside the header document
    return peak / len(header), header


def _output() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)


def test_encoding_a_large_json_output_allocates_about_the_text_not_python_floats() -> None:
    x = _output()
    ratio, header = _peak_ratio(x)
    assert ratio <= MAX_PEAK_PER_OUTPUT, (
        f"encoding a {x.nbytes}-byte FP32 output as JSON peaked at {ratio:.2f}x the text "
        f"(bound {MAX_PEAK_PER_OUTPUT}x): does serve/oip_codec.py go through Python lists?"
    )
    out = orjson.loads(header)["outputs"][0]
    assert out["shape"] == [1, 3, 224, 224]
    assert np.array_equal(np.asarray(out["data"], dtype=np.float32), x.ravel())  # exact float32 round trip


def test_the_guard_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding through ``tolist()`` (what a plain Python server does) breaks the bound by far."""
    monkeypatch.setattr(oip_codec, "_json_data", lambda arr: np.ascontiguousarray(arr).reshape(-1).tolist())
    ratio, _ = _peak_ratio(_output())
    assert ratio > 2 * MAX_PEAK_PER_OUTPUT
