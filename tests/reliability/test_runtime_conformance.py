"""Issue 9 section E (runtime conformance) and F19: what onnxruntime/LiteRT accept, edgert accepts.

Each test reproduces a report with its numbers: an ONNX input declared without a shape refused as
"rank 0", a TFLite scalar input crashing with "Dimension mismatch. Got 1 but expected 0", an
empty batch on TFLite failing in XNNPack where ONNX returns shape (0, 10), int8 I/O types and
quantization missing from ``models inspect``, and unhelpful errors without LiteRT or for a text
file passed as ``.npy``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgert import BackendError, InputError, Runtime
from tests.runtime.synthetic import (
    FLOAT32,
    TflTensor,
    onnx_relu,
    tflite_model,
    tflite_scalar_add,
    tflite_scale_by_scalar,
)

TFLITE_DIGITS = ["digits_small_int8.tflite", "digits_small_int8io.tflite", "digits_large_int8.tflite"]
LITERT_MODULES = [
    "ai_edge_litert",
    "ai_edge_litert.interpreter",
    "tflite_runtime",
    "tflite_runtime.interpreter",
]


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime("cpu-generic")


@pytest.fixture(scope="module")
def digits(models_dir: Path) -> np.ndarray:
    with np.load(models_dir / "digits_test.npz") as npz:
        return npz["x"][:16]


# --- 12. ONNX input of unknown rank -------------------------------------------------------------


def test_onnx_input_without_shape_accepts_any_rank_like_onnxruntime(rt: Runtime) -> None:
    import onnxruntime as ort

    data = onnx_relu(None)
    x = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], dtype=np.float32)  # the reported [2, 3]
    bare = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert bare.get_inputs()[0].shape == []  # onnxruntime cannot tell it from a scalar...
    expected = bare.run(None, {"x": x})[0]  # ...but runs any rank
    model = rt.load(data)
    spec = model.inputs[0]
    assert spec.rank is None and not spec.rank_known
    assert spec.describe() == "x: float32[any rank]"
    assert model.describe()["inputs"] == [{"name": "x", "dtype": "float32", "shape": None}]
    np.testing.assert_array_equal(model.infer({"x": x})["y"], expected)
    for value in (np.float32(-2.0), np.ones((2, 3, 4), np.float32), np.zeros((0, 5), np.float32)):
        assert model.infer({"x": value})["y"].shape == np.shape(value)
    # unknown rank does not switch off the other checks
    with pytest.raises(InputError, match=r"expected dtype float32, got float64"):
        model.infer({"x": x.astype(np.float64)})


def test_onnx_scalar_input_still_refuses_other_ranks(rt: Runtime) -> None:
    model = rt.load(onnx_relu([]))
    assert model.inputs[0].rank == 0 and model.inputs[0].describe() == "x: float32[]"
    assert model.infer({"x": np.float32(-1.5)})["y"] == 0.0
    with pytest.raises(InputError, match=r"expected rank 0 \(x: float32\[\]\), got shape \[2, 3\]"):
        model.infer({"x": np.ones((2, 3), np.float32)})


def test_describe_model_keeps_unknown_rank_apart_from_scalar() -> None:
    from edgert.backends.describe import describe_model

    assert describe_model(onnx_relu(None), "onnx")[0] == [{"name": "x", "dtype": "float32", "shape": None}]
    assert describe_model(onnx_relu([]), "onnx")[0] == [{"name": "x", "dtype": "float32", "shape": []}]
    assert describe_model(onnx_relu(["N", 3]), "onnx")[0] == [
        {"name": "x", "dtype": "float32", "shape": [None, 3]}
    ]


def test_cli_random_input_for_unknown_rank_asks_for_a_shape(edgert_cli, tmp_path: Path) -> None:
    path = tmp_path / "relu_any.onnx"
    path.write_bytes(onnx_relu(None))
    r = edgert_cli("infer", str(path), "--random")
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert "input 'x' is declared without a shape" in r.stderr and "--shape x=" in r.stderr
    r = edgert_cli("infer", str(path), "--random", "--shape", "x=2,3,4", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["outputs"]["y"]["shape"] == [2, 3, 4]
    r = edgert_cli("models", "inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "x: float32[any rank]" in r.stdout


# --- 13. TFLite rank-0 input ---------------------------------------------------------------------


def test_tflite_scalar_input_runs(rt: Runtime) -> None:
    model = rt.load(tflite_scalar_add())
    assert model.inputs[0].shape == () and model.inputs[0].rank == 0
    y = model.infer({"x": np.float32(3.0)})["y"]  # was: Dimension mismatch. Got 1 but expected 0
    assert np.shape(y) == () and float(y) == 6.0


def test_tflite_scalar_beside_a_batched_input(rt: Runtime) -> None:
    model = rt.load(tflite_scale_by_scalar())
    assert {s.name: s.shape for s in model.inputs} == {"scale": (), "x": (None, 4)}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(model.infer({"x": x, "scale": np.float32(2.0)})["y"], x * 2)


# --- 14. Empty batch on TFLite -------------------------------------------------------------------


@pytest.mark.parametrize("name", TFLITE_DIGITS)
def test_tflite_empty_batch_matches_onnx_and_keeps_the_session_usable(
    rt: Runtime, models_dir: Path, digits: np.ndarray, name: str
) -> None:
    empty = np.zeros((0, 64), np.float32)
    onnx_out = rt.load(models_dir / "digits_small_int8.onnx").infer({"pixels": empty})["logits"]
    assert onnx_out.shape == (0, 10)
    model = rt.load(models_dir / name)
    before = model.infer({"pixels": digits[:4]})["logits"]
    out = model.infer({"pixels": empty})["logits"]  # was: XNNPack delegate failed to reshape runtime
    assert out.shape == onnx_out.shape == (0, 10)
    assert out.dtype == onnx_out.dtype == np.float32
    # the empty request must not leave the interpreter in a broken state
    np.testing.assert_array_equal(model.infer({"pixels": digits[:4]})["logits"], before)
    assert model.infer({"pixels": digits[:1]})["logits"].shape == (1, 10)


def test_tflite_empty_batch_with_scalar_and_dynamic_dims(rt: Runtime) -> None:
    model = rt.load(tflite_scale_by_scalar())
    out = model.infer({"x": np.zeros((0, 4), np.float32), "scale": np.float32(2.0)})["y"]
    assert out.shape == (0, 4) and out.dtype == np.float32
    # a dynamic non-batch dimension: the output shape has to be learned from the model
    dyn = tflite_model(
        [TflTensor("x", [1, 1], FLOAT32, [-1, -1]), TflTensor("y", [1, 1], FLOAT32, [-1, -1])],
        [0],
        [1],
        [(0, [0, 0], [1])],
        [(0, None)],
    )
    model = rt.load(dyn)
    assert model.inputs[0].shape == (None, None)
    assert model.infer({"x": np.zeros((0, 7), np.float32)})["y"].shape == (0, 7)
    np.testing.assert_array_equal(model.infer({"x": np.ones((2, 7), np.float32)})["y"], np.full((2, 7), 2.0))


# --- 15. models inspect shows int8 I/O types, scale and zero point -------------------------------


def test_inspect_shows_int8_io_quantization(edgert_cli, models_dir: Path) -> None:
    from ai_edge_litert.interpreter import Interpreter

    path = models_dir / "digits_small_int8io.tflite"
    raw = Interpreter(model_content=path.read_bytes())
    (inp,), (out,) = raw.get_input_details(), raw.get_output_details()
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    assert (inp["dtype"], in_zero, out["dtype"], out_zero) == (np.int8, -128, np.int8, 18)

    r = edgert_cli("models", "inspect", str(path))
    assert r.returncode == 0, r.stderr
    assert "variant:  int8" in r.stdout
    assert f"pixels: float32[?, 64] (int8 in the model, scale {in_scale:.8g}, zero point -128)" in r.stdout
    assert f"logits: float32[?, 10] (int8 in the model, scale {out_scale:.8g}, zero point 18)" in r.stdout

    r = edgert_cli("models", "inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["variant"] == "int8"
    assert doc["inputs"] == [
        {
            "name": "pixels",
            "dtype": "float32",
            "shape": [-1, 64],
            "quantization": {"dtype": "int8", "scale": pytest.approx(in_scale, rel=1e-7), "zero_point": -128},
        }
    ]
    assert doc["outputs"][0]["quantization"] == {
        "dtype": "int8",
        "scale": pytest.approx(out_scale, rel=1e-7),
        "zero_point": 18,
    }


def test_inspect_float_io_tflite_has_no_quantization(edgert_cli, models_dir: Path) -> None:
    r = edgert_cli("models", "inspect", str(models_dir / "digits_small_int8.tflite"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}]
    assert doc["variant"] == "int8"  # int8 inside, float32 at the edges


# --- F19. Errors a user can act on ---------------------------------------------------------------


def test_tflite_without_litert_says_how_to_install(
    rt: Runtime, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgert.backends.describe import describe_model, detect_variant

    for name in LITERT_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # makes the import fail
    data = (models_dir / "digits_small_int8io.tflite").read_bytes()
    with pytest.raises(BackendError, match=r"LiteRT is not installed") as err:
        rt.load(data)
    assert "pip install 'edgert[litert]'" in (err.value.hint or "")
    # describing a .tflite (package creation, models import) needs no LiteRT at all
    inputs, _ = describe_model(data, "tflite")
    assert inputs[0]["quantization"]["dtype"] == "int8"
    assert detect_variant(data, "tflite") == "int8"


def test_cli_tflite_without_litert_says_how_to_install(models_dir: Path) -> None:
    code = (
        "import sys\n"
        f"for m in {LITERT_MODULES!r}: sys.modules[m] = None\n"
        "from edgert.cli.main import main\n"
        "sys.argv = ['edgert', 'infer', sys.argv[1], '--random']\n"
        "sys.exit(main())\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(models_dir / "digits_small_int8.tflite")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: cannot load a TFLite model: LiteRT is not installed")
    assert "pip install 'edgert[litert]'" in r.stderr


@pytest.mark.parametrize(
    ("content", "looks"),
    [(b"0.1,0.2,0.3\n0.4,0.5,0.6\n", "text"), (b"\x00\x01\x02garbage" * 8, "something else")],
)
@pytest.mark.parametrize("named", [False, True])
def test_cli_non_npy_input_gets_a_clear_error(
    edgert_cli, models_dir: Path, tmp_path: Path, content: bytes, looks: str, named: bool
) -> None:
    bad = tmp_path / "x.npy"
    bad.write_bytes(content)
    arg = f"pixels={bad}" if named else str(bad)
    r = edgert_cli("infer", str(models_dir / "digits_small_int8.onnx"), "--input", arg)
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"error: input file {bad} is not a NumPy .npy/.npz file")
    assert f"it looks like {looks}" in r.stderr and "numpy.save(" in r.stderr
    assert "pickle" not in r.stderr.lower()


def test_cli_object_array_npy_is_refused_without_unpickling(
    edgert_cli, models_dir: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "obj.npy"
    np.save(bad, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    r = edgert_cli("infer", str(models_dir / "digits_small_int8.onnx"), "--input", str(bad))
    assert r.returncode == 4 and "Traceback" not in r.stderr
    assert "holds Python objects (dtype=object), not numbers" in r.stderr
    assert "allow_pickle" not in r.stderr
