"""Fixtures for the committed sample models: cards, the held-out digits split, and bare runtimes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

OnnxRunner = Callable[[bytes, dict[str, np.ndarray]], np.ndarray]
TfliteRunner = Callable[[bytes, np.ndarray], np.ndarray]


@pytest.fixture(scope="session")
def cards(models_dir: Path) -> dict[str, Any]:
    """models/cards.json, parsed."""
    return dict(json.loads((models_dir / "cards.json").read_text()))


@pytest.fixture(scope="session")
def digits_test(models_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The held-out digits split (x float32 [N,64], y int64 [N])."""
    with np.load(models_dir / "digits_test.npz", allow_pickle=False) as npz:
        return npz["x"], npz["y"]


def run_onnx(model: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run a model with bare onnxruntime from bytes and return its `logits` output."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["logits"], feeds)[0])


def run_tflite(model: bytes, x: np.ndarray) -> np.ndarray:
    """Run a .tflite with bare ai_edge_litert from bytes, (de)quantizing int8 I/O from the tensor params."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=model)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    if -1 in inp["shape_signature"]:
        it.resize_tensor_input(inp["index"], list(x.shape))
        it.allocate_tensors()
        return _invoke(it, inp, out, x)
    it.allocate_tensors()  # fixed batch 1: one row at a time
    return np.concatenate([_invoke(it, inp, out, row[None, :]) for row in x])


def _invoke(it: Any, inp: dict[str, Any], out: dict[str, Any], x: np.ndarray) -> np.ndarray:
    scale, zero = inp["quantization"]
    if inp["dtype"] != np.float32:
        info = np.iinfo(inp["dtype"])
        x = np.clip(np.round(x / scale + zero), info.min, info.max).astype(inp["dtype"])
    it.set_tensor(inp["index"], x)
    it.invoke()
    y = np.asarray(it.get_tensor(out["index"]))
    if out["dtype"] != np.float32:
        oscale, ozero = out["quantization"]
        y = (y.astype(np.float32) - ozero) * oscale
    return y


@pytest.fixture(scope="session")
def onnx_runner() -> OnnxRunner:
    """run_onnx, as a fixture (tests cannot import conftest under --import-mode=importlib)."""
    return run_onnx


@pytest.fixture(scope="session")
def tflite_runner() -> TfliteRunner:
    """run_tflite, as a fixture."""
    return run_tflite


@pytest.fixture(scope="session")
def measured_accuracy(models_dir: Path, digits_test: tuple[np.ndarray, np.ndarray]) -> Callable[[str], float]:
    """Accuracy in percent of a committed digits model on the held-out split, run with its bare runtime."""
    x, y = digits_test
    memo: dict[str, float] = {}

    def measure(name: str) -> float:
        if name not in memo:
            blob = (models_dir / name).read_bytes()
            logits = run_tflite(blob, x) if name.endswith(".tflite") else run_onnx(blob, {"pixels": x})
            assert logits.shape == (len(x), 10), f"{name}: logits shape {logits.shape}"
            memo[name] = 100.0 * float((logits.argmax(1) == y).mean())
        return memo[name]

    return measure
