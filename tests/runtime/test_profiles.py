"""Device profile schema: every shipped profile validates, and bad profiles fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgert.errors import ConfigError
from edgert.profiles import available_profiles, load_profile, parse_profile, tomllib

REQUIRED = {"cpu-generic", "raspberry-pi", "jetson-orin", "coral-edgetpu", "intel-openvino", "qualcomm-qnn"}


def test_shipped_profiles_validate(repo_root: Path) -> None:
    files = sorted((repo_root / "device_profiles").glob("*.toml"))
    names = {parse_profile(tomllib.loads(f.read_text()), str(f)).name for f in files}
    assert REQUIRED <= names
    assert set(available_profiles()) >= REQUIRED


def test_jetson_order_and_fp16() -> None:
    p = load_profile("jetson-orin")
    assert [s.name for s in p.providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert p.variants[0] == "fp16"
    assert p.providers[0].options["trt_fp16_enable"] is True
    # a TensorRT engine cache would be a plaintext copy of the model on disk
    assert p.providers[0].options["trt_engine_cache_enable"] is False
    assert p.engine_cache == "disabled"


def test_coral_openvino_qnn_shapes() -> None:
    coral = load_profile("coral-edgetpu")
    assert coral.delegates[0].library == "libedgetpu.so.1"
    assert coral.variants[0] == "edgetpu"
    ov = load_profile("intel-openvino")
    assert [s.options.get("device_type") for s in ov.providers[:3]] == ["NPU", "GPU", "CPU"]
    qnn = load_profile("qualcomm-qnn")
    assert qnn.providers[0].name == "QNNExecutionProvider"
    assert qnn.providers[0].options["backend_type"] == "htp"


def test_choose_variant() -> None:
    assert load_profile("jetson-orin").choose_variant(["int8", "fp16"]) == "fp16"
    assert load_profile("coral-edgetpu").choose_variant(["fp32", "edgetpu"]) == "edgetpu"
    assert load_profile("cpu-generic").choose_variant(["fp32", "int8"]) == "int8"
    assert load_profile("cpu-generic").choose_variant([]) is None


GOOD = {"schema": 1, "name": "x", "onnx": {"providers": [{"name": "CPUExecutionProvider"}]}}


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        ({**GOOD, "runtme": {}}, "runtme: is not a known key (allowed:"),
        (
            {**GOOD, "runtime": {"thread": 2}},
            "runtime.thread: is not a known key (allowed: engine_cache, threads, variants)",
        ),
        (
            {**GOOD, "runtime": {"threads": "two"}},
            "runtime.threads: must be an integer, got str",
        ),
        (
            {**GOOD, "runtime": {"threads": True}},
            "runtime.threads: must be an integer, got true",
        ),
        (
            {**GOOD, "runtime": {"variants": ["int4"]}},
            "runtime.variants[0]: unknown variant 'int4' (allowed: int8, fp16, fp32, edgetpu)",
        ),
        ({"schema": 1}, "name: is required"),
        ({"name": "x"}, "schema: is required"),
        ({**GOOD, "schema": 9}, "schema: unsupported schema version 9"),
        (
            {**GOOD, "onnx": {"providers": [{"name": "Cuda"}]}},
            "onnx.providers[0].name: 'Cuda' is not an onnxruntime provider name",
        ),
        (
            {**GOOD, "onnx": {"providers": [{"options": {}}]}},
            "onnx.providers[0].name: is required",
        ),
        ({**GOOD, "limits": {"max_batch": 0}}, "limits.max_batch: must be an integer >= 1, got 0"),
        (
            {**GOOD, "litert": {"delegates": [{"name": "tpu"}]}},
            "litert.delegates[0].library: is required",
        ),
        ({**GOOD, "detect": {"files": "/etc/x"}}, "detect.files: must be a list of strings"),
        ({**GOOD, "runtime": {"engine_cache": "plain"}}, "allowed: disabled, encrypted"),
    ],
)
def test_bad_profile_names_file_key_and_allowed(doc: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_profile(doc, "/etc/edgert/device_profiles/x.toml")
    assert str(err.value).startswith("/etc/edgert/device_profiles/x.toml: ")
    assert fragment in str(err.value)


def test_unknown_profile_lists_available() -> None:
    with pytest.raises(ConfigError) as err:
        load_profile("jetson-nano-9000")
    assert "unknown device profile 'jetson-nano-9000'" in err.value.message
    assert "cpu-generic" in err.value.message
    assert "edgert profiles list" in (err.value.hint or "")


def test_invalid_toml_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.toml"
    bad.write_text('schema = 1\nname = "x\n')
    with pytest.raises(ConfigError, match=r"broken.toml: not valid TOML"):
        load_profile(bad)
    with pytest.raises(ConfigError, match=r"cannot read profile"):
        load_profile(tmp_path / "missing.toml")


def test_profile_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine.toml").write_text('schema = 1\nname = "mine"\n[runtime]\nthreads = 1\n')
    monkeypatch.setenv("EDGERT_PROFILE_DIR", str(tmp_path))
    p = load_profile("mine")
    assert p.threads == 1
    assert [s.name for s in p.providers] == ["CPUExecutionProvider"]
