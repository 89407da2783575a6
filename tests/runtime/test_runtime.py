"""Runtime API on the real sample models: loading, validation and clear errors for bad input."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest

from edgert import InputError, ModelError, ModelOptions, Runtime

DIGITS = [
    "digits_small_fp32.onnx",
    "digits_small_int8.onnx",
    "digits_small_int8.tflite",
    "digits_large_fp32.onnx",
    "digits_large_int8.onnx",
    "digits_large_int8.tflite",
]


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime("cpu-generic")


@pytest.fixture(scope="module")
def digits(models_dir: Path):
    with np.load(models_dir / "digits_test.npz") as npz:
        return npz["x"], npz["y"]


@pytest.fixture(scope="module")
def small(rt: Runtime, models_dir: Path):
    return rt.load(
        models_dir / "digits_small_int8.onnx", options=ModelOptions(nan_policy="reject", max_batch=64)
    )


@pytest.mark.parametrize("name", DIGITS)
def test_digits_signature_and_accuracy(rt: Runtime, models_dir: Path, digits, name: str) -> None:
    x, y = digits
    model = rt.load(models_dir / name)
    assert [(s.name, s.dtype.name, s.shape) for s in model.inputs] == [("pixels", "float32", (None, 64))]
    assert [(s.name, s.dtype.name, s.shape) for s in model.outputs] == [("logits", "float32", (None, 10))]
    logits = np.concatenate([model.infer({"pixels": x[i : i + 32]})["logits"] for i in range(0, len(x), 32)])
    assert logits.dtype == np.float32
    acc = float((logits.argmax(1) == y).mean())
    assert acc > 0.9, f"{name}: accuracy {acc:.4f} through the Runtime is far below its model card"


def test_tflite_int8_io_is_float_and_matches_onnx(rt: Runtime, models_dir: Path, digits) -> None:
    x, _ = digits
    tfl = rt.load(models_dir / "digits_small_int8.tflite")
    onnx = rt.load(models_dir / "digits_small_fp32.onnx")
    a = tfl.infer({"pixels": x[:32]})["logits"]
    b = onnx.infer({"pixels": x[:32]})["logits"]
    # dequantized int8 logits agree with fp32 on the predicted class almost everywhere
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    assert tfl.provider == "litert:cpu"


def test_load_from_bytes_equals_load_from_path(rt: Runtime, models_dir: Path, digits) -> None:
    x, _ = digits
    path = models_dir / "digits_large_int8.onnx"
    from_path = rt.load(path).infer({"pixels": x[:8]})["logits"]
    from_bytes = rt.load(bytearray(path.read_bytes()), name="large").infer({"pixels": x[:8]})["logits"]
    np.testing.assert_array_equal(from_path, from_bytes)


def test_outputs_selection_and_unknown_output(small, digits) -> None:
    x, _ = digits
    assert set(small.infer({"pixels": x[:1]}, outputs=["logits"])) == {"logits"}
    with pytest.raises(InputError, match=r"has no output\(s\) \['probs'\]; outputs are \['logits'\]"):
        small.infer({"pixels": x[:1]}, outputs=["probs"])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"image": np.zeros((1, 64), np.float32)},
            r"expects inputs \['pixels'\], got \['image'\] \(missing \['pixels'\]; unknown \['image'\]\)",
        ),
        ({}, r"missing \['pixels'\]"),
        ({"pixels": np.zeros((1, 64), np.float32), "extra": np.zeros(1)}, r"unknown \['extra'\]"),
        ({"pixels": np.zeros((1, 64), np.float64)}, r"expected dtype float32, got float64"),
        ({"pixels": np.zeros((1, 64), np.complex64)}, r"expected dtype float32, got complex64"),
        (
            {"pixels": np.zeros((64,), np.float32)},
            r"expected rank 2 \(pixels: float32\[\?, 64\]\), got shape \[64\]",
        ),
        ({"pixels": np.zeros((1, 8, 8), np.float32)}, r"expected rank 2"),
        (
            {"pixels": np.zeros((1, 63), np.float32)},
            r"dimension 1 must be 64 \(pixels: float32\[\?, 64\]\), got shape \[1, 63\]",
        ),
        ({"pixels": np.zeros((65, 64), np.float32)}, r"batch size 65 exceeds the maximum of 64"),
        (
            {"pixels": np.full((2, 64), np.nan, np.float32)},
            r"contains NaN or Inf, which model 'digits_small_int8' rejects",
        ),
        ({"pixels": np.full((1, 64), np.inf, np.float32)}, r"contains NaN or Inf"),
        ({"pixels": [["a"] * 64]}, r"expected numbers of dtype float32"),
        ([np.zeros((1, 64), np.float32)], r"inputs must be a mapping"),
    ],
)
def test_bad_inputs_get_clear_errors(small, inputs, message: str) -> None:
    with pytest.raises(InputError, match=message):
        small.infer(inputs)
    # and the model keeps working afterwards
    assert small.infer({"pixels": np.zeros((1, 64), np.float32)})["logits"].shape == (1, 10)


def test_safe_casts_and_lists_are_accepted(small) -> None:
    base = small.infer({"pixels": np.ones((1, 64), np.float32)})["logits"]
    np.testing.assert_array_equal(small.infer({"pixels": np.ones((1, 64), np.int16)})["logits"], base)
    np.testing.assert_array_equal(small.infer({"pixels": [[1.0] * 64]})["logits"], base)


def test_nan_allowed_by_default(rt: Runtime, models_dir: Path) -> None:
    model = rt.load(models_dir / "digits_small_fp32.onnx")
    out = model.infer({"pixels": np.full((1, 64), np.nan, np.float32)})["logits"]
    assert np.isnan(out).any()


# ---------------------------------------------------------------------------- bad model files
def test_missing_file(rt: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"does not exist") as err:
        rt.load(tmp_path / "nope.onnx")
    assert err.value.hint == "check the path"


def test_directory_and_empty_file(rt: Runtime, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"is a directory"):
        rt.load(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is empty"):
        rt.load(tmp_path / "empty.onnx")


@contextlib.contextmanager
def _as_nobody():
    """Drop the effective uid when running as root, so file permissions really apply."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unreadable_file(rt: Runtime, models_dir: Path, tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    target = tmp_path / "secret.onnx"
    target.write_bytes((models_dir / "digits_small_int8.onnx").read_bytes())
    target.chmod(0o000)
    with _as_nobody(), pytest.raises(ModelError, match=r"is not readable by this user") as err:
        rt.load(target)
    assert "permissions" in (err.value.hint or "")


@pytest.mark.parametrize("name", ["digits_small_int8.onnx", "digits_small_int8.tflite"])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_model(rt: Runtime, models_dir: Path, tmp_path: Path, name: str, keep: float) -> None:
    data = (models_dir / name).read_bytes()
    bad = tmp_path / name
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError, match=r"could not load the model") as err:
        rt.load(bad)
    assert "truncated or corrupt" in (err.value.hint or "")


def test_corrupt_onnx(rt: Runtime, models_dir: Path) -> None:
    data = bytearray((models_dir / "digits_small_int8.onnx").read_bytes())
    data[2:200] = os.urandom(198)  # smash the protobuf structure after the first tag
    with pytest.raises(ModelError, match=r"onnxruntime could not load the model"):
        rt.load(data)


def test_corrupt_tflite(rt: Runtime, models_dir: Path) -> None:
    data = bytearray((models_dir / "digits_small_int8.tflite").read_bytes())
    data[8:] = bytes(len(data) - 8)  # keep the TFL3 identifier, zero the flatbuffer
    with pytest.raises(ModelError, match=r"LiteRT could not load the model"):
        rt.load(data)


@pytest.mark.parametrize(
    "payload", [b"\x89PNG\r\n\x1a\n" + bytes(100), b'{"not": "a model"}', b"%PDF-1.7 ..."]
)
def test_wrong_format(rt: Runtime, tmp_path: Path, payload: bytes) -> None:
    f = tmp_path / "model.onnx"
    f.write_bytes(payload)
    with pytest.raises(ModelError, match=r"is neither ONNX nor TFLite"):
        rt.load(f)


def test_model_options_are_validated() -> None:
    from edgert import ConfigError

    with pytest.raises(ConfigError, match=r"nan_policy: got 'drop'; allowed: allow, reject"):
        ModelOptions(nan_policy="drop")
    with pytest.raises(ConfigError, match=r"max_batch: must be >= 1"):
        ModelOptions(max_batch=0)


def test_public_api_is_pinned() -> None:
    import edgert

    assert sorted(edgert.__all__) == sorted(
        [
            "BackendError",
            "ConfigError",
            "EdgertError",
            "InputError",
            "IntegrityError",
            "KeyFileError",
            "Model",
            "ModelError",
            "ModelOptions",
            "OverloadedError",
            "Profile",
            "ProvisionError",
            "RollbackError",
            "Runtime",
            "SecurityError",
            "ServeError",
            "StoreError",
            "SyncError",
            "TensorSpec",
            "__version__",
            "load_profile",
        ]
    )
    for name in edgert.__all__:
        assert getattr(edgert, name) is not None


def test_tflite_int8_inputs_and_outputs_are_quantized_for_the_caller(
    rt: Runtime, models_dir: Path, digits
) -> None:
    """A real .tflite with int8 input/output tensors: callers pass and receive float32."""
    from ai_edge_litert.interpreter import Interpreter

    x, y = digits
    path = models_dir / "digits_small_int8io.tflite"
    raw = Interpreter(model_content=path.read_bytes())
    assert raw.get_input_details()[0]["dtype"] == np.int8  # the file really has int8 I/O
    assert raw.get_output_details()[0]["dtype"] == np.int8
    model = rt.load(path)
    assert [(s.name, s.dtype.name) for s in model.inputs] == [("pixels", "float32")]
    assert [(s.name, s.dtype.name) for s in model.outputs] == [("logits", "float32")]
    logits = np.concatenate([model.infer({"pixels": x[i : i + 32]})["logits"] for i in range(0, len(x), 32)])
    assert logits.dtype == np.float32
    # dequantized logits are real-valued scores, not raw int8 codes
    assert np.abs(logits).max() < 127 and len(np.unique(logits)) > 10
    import json

    card = json.loads((models_dir / "cards.json").read_text())["models"]["digits_small_int8io.tflite"]
    acc = float((logits.argmax(1) == y).mean())
    assert abs(acc * 100 - card["accuracy_pct"]) <= 0.1
    float_io = rt.load(models_dir / "digits_small_int8.tflite").infer({"pixels": x[:32]})["logits"]
    assert (logits[:32].argmax(1) == float_io.argmax(1)).mean() >= 0.95
