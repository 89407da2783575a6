"""Committed sample models load in bare onnxruntime / LiteRT and match their cards (no torch or sklearn)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

MAX_BYTES = 5 * 1024 * 1024
ACCURACY_TOLERANCE_PT = 0.1
MAX_INT8_DROP_PT = 0.5
MODEL_SUFFIXES = (".onnx", ".tflite")
DIGITS_FAMILIES = ("digits_small", "digits_large")
DIGITS_ONNX = [f"{f}_{p}.onnx" for f in DIGITS_FAMILIES for p in ("fp32", "int8")]
DIGITS_TFLITE = [f"{f}_int8.tflite" for f in DIGITS_FAMILIES]


def _committed(cards: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cards["models"].items() if v["committed"]}


def test_every_model_file_has_a_card_and_every_committed_card_a_file(
    models_dir: Path, cards: dict[str, Any]
) -> None:
    on_disk = {p.name for p in models_dir.iterdir() if p.suffix in MODEL_SUFFIXES}
    assert on_disk == set(_committed(cards))
    assert {*DIGITS_ONNX, *DIGITS_TFLITE, "mobilenetv2_int8.onnx"} <= on_disk


def test_sha256_and_size_match_cards(models_dir: Path, cards: dict[str, Any]) -> None:
    for name, card in _committed(cards).items():
        blob = (models_dir / name).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == card["sha256"], name
        assert len(blob) == card["size_bytes"], name
    npz = (models_dir / cards["dataset"]["file"]).read_bytes()
    assert hashlib.sha256(npz).hexdigest() == cards["dataset"]["sha256"]


def test_committed_files_are_at_most_5_mb(models_dir: Path) -> None:
    too_big = {
        p.name: p.stat().st_size
        for p in models_dir.rglob("*")
        if p.is_file() and "generated" not in p.parts and p.stat().st_size > MAX_BYTES
    }
    assert too_big == {}


def test_held_out_split_is_raw_stratified_digits(
    digits_test: tuple[np.ndarray, np.ndarray], cards: dict[str, Any]
) -> None:
    x, y = digits_test
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.shape == (cards["dataset"]["n_test"], 64) and y.shape == (len(x),)
    assert x.min() == 0 and x.max() == 16 and np.array_equal(x, np.round(x))
    counts = np.bincount(y, minlength=10)
    assert len(counts) == 10 and counts.min() >= 35 and counts.max() <= 37  # 20% of ~178-183 per class


@pytest.mark.parametrize("name", DIGITS_ONNX + DIGITS_TFLITE)
def test_digits_accuracy_matches_card(
    name: str, cards: dict[str, Any], measured_accuracy: Callable[[str], float]
) -> None:
    assert measured_accuracy(name) == pytest.approx(
        cards["models"][name]["accuracy_pct"], abs=ACCURACY_TOLERANCE_PT
    )


@pytest.mark.parametrize("family", DIGITS_FAMILIES)
def test_int8_drops_at_most_half_a_point(family: str, measured_accuracy: Callable[[str], float]) -> None:
    fp32 = measured_accuracy(f"{family}_fp32.onnx")
    for variant in (f"{family}_int8.onnx", f"{family}_int8.tflite"):
        assert fp32 - measured_accuracy(variant) <= MAX_INT8_DROP_PT, variant


def test_cascade_pair_meets_its_design_targets(
    cards: dict[str, Any], measured_accuracy: Callable[[str], float]
) -> None:
    small, large = cards["models"]["digits_small_fp32.onnx"], cards["models"]["digits_large_fp32.onnx"]
    assert small["macs_per_sample"] <= 0.15 * large["macs_per_sample"]
    assert measured_accuracy("digits_large_fp32.onnx") >= 98.5
    assert measured_accuracy("digits_small_fp32.onnx") >= 95.0


@pytest.mark.parametrize("name", DIGITS_ONNX)
def test_digits_onnx_signature_and_dynamic_batch(
    name: str, models_dir: Path, digits_test: tuple[np.ndarray, np.ndarray], onnx_runner: Any
) -> None:
    blob = (models_dir / name).read_bytes()
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("pixels", "tensor(float)", [64])
    assert (out.name, out.type, out.shape[1:]) == ("logits", "tensor(float)", [10])
    assert isinstance(inp.shape[0], str) and isinstance(out.shape[0], str)  # symbolic batch dimension
    x = digits_test[0][:7]
    whole = onnx_runner(blob, {"pixels": x})
    one_by_one = np.concatenate([onnx_runner(blob, {"pixels": row[None, :]}) for row in x])
    np.testing.assert_allclose(whole, one_by_one, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", DIGITS_TFLITE)
def test_digits_tflite_signature_and_dynamic_batch(
    name: str, models_dir: Path, digits_test: tuple[np.ndarray, np.ndarray], tflite_runner: Any
) -> None:
    from ai_edge_litert.interpreter import Interpreter

    blob = (models_dir / name).read_bytes()
    it = Interpreter(model_content=blob)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert list(inp["shape_signature"]) == [-1, 64] and list(out["shape_signature"]) == [-1, 10]
    assert inp["dtype"] == np.float32 and out["dtype"] == np.float32
    assert any(d["dtype"] == np.int8 for d in it.get_tensor_details())  # really integer inside
    x = digits_test[0][:7]
    np.testing.assert_array_equal(
        tflite_runner(blob, x), np.concatenate([tflite_runner(blob, r[None, :]) for r in x])
    )


def test_mobilenetv2_int8_io(models_dir: Path, cards: dict[str, Any], onnx_runner: Any) -> None:
    blob = (models_dir / "mobilenetv2_int8.onnx").read_bytes()
    sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("input", "tensor(float)", [3, 224, 224])
    assert (out.name, out.type, out.shape[1:]) == ("logits", "tensor(float)", [1000])
    assert isinstance(inp.shape[0], str)
    card = cards["models"]["mobilenetv2_int8.onnx"]
    assert card["params"] == 3_504_872
    assert card["size_bytes"] < 1.5 * card["params"]  # int8 weights; fp32 would be ~4 bytes per parameter
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224), dtype=np.float32)
    logits = onnx_runner(blob, {"input": x})
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
    assert not np.allclose(logits[0], logits[1])  # the output depends on the input
