"""The real ``edgert`` CLI in a subprocess: doctor, profiles, inspect, infer, bench, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def test_help_lists_commands(edgert_cli) -> None:
    r = edgert_cli("--help")
    assert r.returncode == 0
    for cmd in ("doctor", "profiles", "models", "infer", "bench"):
        assert cmd in r.stdout


def test_doctor_json(edgert_cli) -> None:
    r = edgert_cli("doctor", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backends"]["onnxruntime"]["ok"] is True
    assert "CPUExecutionProvider" in doc["backends"]["onnxruntime"]["providers"]
    assert doc["backends"]["litert"]["ok"] is True
    assert doc["profile"] == "cpu-generic"
    names = {p["name"] for p in doc["profiles"]}
    assert {"jetson-orin", "coral-edgetpu", "qualcomm-qnn"} <= names
    jetson = next(p for p in doc["profiles"] if p["name"] == "jetson-orin")
    assert not jetson["matched"] and "/etc/nv_tegra_release" in " ".join(jetson["reasons"])


def test_doctor_text(edgert_cli) -> None:
    r = edgert_cli("doctor")
    assert r.returncode == 0
    assert "detected profile: cpu-generic" in r.stdout


def test_profiles_list_and_show(edgert_cli) -> None:
    r = edgert_cli("profiles", "list")
    assert r.returncode == 0 and "jetson-orin" in r.stdout
    r = edgert_cli("profiles", "show", "jetson-orin")
    assert "TensorrtExecutionProvider" in r.stdout and "trt_fp16_enable=True" in r.stdout
    r = edgert_cli("profiles", "show", "nope")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown device profile 'nope'")
    assert "Traceback" not in r.stderr


def test_models_inspect(edgert_cli, models_dir: Path) -> None:
    r = edgert_cli("models", "inspect", str(models_dir / "digits_small_int8.tflite"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "tflite"
    assert doc["inputs"] == [{"name": "pixels", "dtype": "float32", "shape": [-1, 64]}]
    assert doc["provider"] == "litert:cpu"
    assert len(doc["sha256"]) == 64


def test_infer_from_npy_matches_python(edgert_cli, models_dir: Path, tmp_path: Path) -> None:
    with np.load(models_dir / "digits_test.npz") as npz:
        x = npz["x"][:4]
    np.save(tmp_path / "x.npy", x)
    r = edgert_cli(
        "infer",
        str(models_dir / "digits_small_fp32.onnx"),
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "out.npz"),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    from edgert import Runtime

    expected = Runtime().load(models_dir / "digits_small_fp32.onnx").infer({"pixels": x})["logits"]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["logits"], expected, rtol=1e-6)
    assert json.loads(r.stdout)["outputs"]["logits"]["shape"] == [4, 10]


def test_infer_random_text(edgert_cli, models_dir: Path) -> None:
    r = edgert_cli("infer", str(models_dir / "digits_large_int8.onnx"), "--random", "--batch", "3")
    assert r.returncode == 0, r.stderr
    assert "logits: float32[3, 10]" in r.stdout and "top classes" in r.stdout


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (
            ["infer", "/nonexistent/model.onnx", "--random"],
            3,
            "error: model file /nonexistent/model.onnx does not exist",
        ),
        (["infer", "{models}/digits_small_int8.onnx"], 4, "error: give either --input FILE or --random"),
        (["infer", "{models}/digits_small_int8.onnx", "--input", "{tmp}/missing.npy"], 4, "does not exist"),
        (["infer", "{models}/digits_small_int8.onnx", "--input", "{tmp}/bad.npy"], 4, "expected dimension"),
        (
            ["infer", "{models}/digits_small_int8.onnx", "--input", "{tmp}/f64.npy"],
            4,
            "expected dtype float32, got float64",
        ),
        (["bench", "{models}/digits_small_int8.onnx", "--profile", "nope"], 2, "unknown device profile"),
        (["models", "inspect", "{tmp}/junk.onnx"], 3, "neither ONNX nor TFLite"),
    ],
)
def test_cli_errors_are_one_line_and_exit_nonzero(
    edgert_cli, models_dir: Path, tmp_path: Path, args, code, fragment
):
    np.save(tmp_path / "bad.npy", np.zeros((1, 32), np.float32))
    np.save(tmp_path / "f64.npy", np.zeros((1, 64), np.float64))
    (tmp_path / "junk.onnx").write_bytes(b"hello world, not a model")
    argv = [a.format(models=models_dir, tmp=tmp_path) for a in args]
    r = edgert_cli(*argv)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ")
    if fragment != "expected dimension":
        assert fragment in r.stderr
    else:
        assert "dimension 1 must be 64" in r.stderr


def test_bench_json(edgert_cli, models_dir: Path) -> None:
    r = edgert_cli(
        "bench",
        str(models_dir / "digits_small_int8.onnx"),
        "--seconds",
        "0.2",
        "--batch",
        "4",
        "--threads",
        "1",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["provider"] == "CPUExecutionProvider"
    assert doc["batch"] == 4 and doc["iterations"] > 0
    assert doc["p50_ms"] <= doc["p90_ms"] <= doc["p99_ms"]
    assert doc["throughput_per_s"] > 0


def test_bench_text_tflite(edgert_cli, models_dir: Path) -> None:
    r = edgert_cli("bench", str(models_dir / "digits_small_int8.tflite"), "--iterations", "50")
    assert r.returncode == 0, r.stderr
    assert "provider   litert:cpu" in r.stdout and "p99" in r.stdout
