"""edgert.backends.describe: format, inputs/outputs and variant read from a model's bytes alone.

Oracles: the model cards (``models/cards.json`` records each sample model's precision), the
``onnx`` package (for the protobuf walk), LiteRT itself (for the flatbuffer walk) and the
runtime's own view of each model (describe must agree with what is served).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgert import ModelError, Runtime
from edgert.backends import _onnx_proto
from edgert.backends.describe import describe_model, detect_variant, model_specs, sniff_format
from tests.runtime import synthetic as syn

SAMPLES = [
    "digits_small_fp32.onnx",
    "digits_small_int8.onnx",
    "digits_large_fp32.onnx",
    "digits_large_int8.onnx",
    "mobilenetv2_int8.onnx",
    "digits_small_int8.tflite",
    "digits_small_int8io.tflite",
    "digits_large_int8.tflite",
]


@pytest.fixture(scope="module")
def cards(models_dir: Path) -> dict:
    return json.loads((models_dir / "cards.json").read_text())["models"]


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return Runtime("cpu-generic")


@pytest.mark.parametrize("name", SAMPLES)
def test_sample_models_format_and_variant_match_their_cards(models_dir: Path, cards: dict, name: str) -> None:
    data = (models_dir / name).read_bytes()
    card = cards[name]
    assert sniff_format(data, name) == card["format"]
    assert detect_variant(data, card["format"]) == card["precision"]


@pytest.mark.parametrize("name", ["digits_small_int8.onnx", "digits_large_int8.tflite"])
@pytest.mark.parametrize("new_name", ["digits.onnx", "digits_fp32.onnx", "model.bin", None])
def test_variant_and_format_come_from_content_not_the_file_name(
    models_dir: Path, tmp_path: Path, name: str, new_name: str | None
) -> None:
    """The review found an int8 model renamed to digits.onnx recorded as fp32."""
    data = (models_dir / name).read_bytes()
    if new_name is not None:
        (tmp_path / new_name).write_bytes(data)
        data = (tmp_path / new_name).read_bytes()
    fmt = sniff_format(data, new_name)
    assert fmt == name.rsplit(".", 1)[1]
    assert detect_variant(data, fmt) == "int8"


def test_tflite_named_onnx_and_onnx_named_tflite(models_dir: Path) -> None:
    tfl = (models_dir / "digits_small_int8.tflite").read_bytes()
    onnx = (models_dir / "digits_small_fp32.onnx").read_bytes()
    assert sniff_format(tfl, "model.onnx") == "tflite"
    assert sniff_format(onnx, "model.tflite") == "onnx"
    assert sniff_format(memoryview(onnx)) == "onnx"


@pytest.mark.parametrize("name", SAMPLES)
def test_describe_agrees_with_the_loaded_model(rt: Runtime, models_dir: Path, name: str) -> None:
    data = (models_dir / name).read_bytes()
    fmt = sniff_format(data, name)
    model = rt.load(data, format=fmt)
    assert model_specs(data, fmt) == (model.inputs, model.outputs)
    inputs, outputs = describe_model(data, fmt)
    for doc, spec in zip([*inputs, *outputs], [*model.inputs, *model.outputs], strict=True):
        assert doc["name"] == spec.name and doc["dtype"] == spec.dtype.name
        assert doc["shape"] == list(spec.shape)
        assert None in doc["shape"]  # every sample model has a dynamic batch
    assert json.loads(json.dumps(inputs)) == inputs


@pytest.mark.parametrize(
    "build", [syn.tflite_scalar_add, syn.tflite_scale_by_scalar, syn.tflite_fp16_weights]
)
def test_describe_agrees_with_litert_on_synthetic_tflite(rt: Runtime, build) -> None:
    data = build()
    model = rt.load(data)
    assert model_specs(data, "tflite") == (model.inputs, model.outputs)


@pytest.mark.parametrize("name", [n for n in SAMPLES if n.endswith(".onnx")])
def test_protobuf_walk_matches_the_onnx_package(models_dir: Path, name: str) -> None:
    import onnx

    data = (models_dir / name).read_bytes()
    ref = onnx.load_from_string(data)
    graph = _onnx_proto.parse_model(data)
    assert graph.ir_version == ref.ir_version

    def dims(vi) -> tuple | None:
        if not vi.type.tensor_type.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)

    init = {t.name for t in ref.graph.initializer}
    assert [(v.name, v.elem_type, v.dims) for v in graph.inputs] == [
        (vi.name, vi.type.tensor_type.elem_type, dims(vi)) for vi in ref.graph.input if vi.name not in init
    ]
    assert [(v.name, v.elem_type, v.dims) for v in graph.outputs] == [
        (vi.name, vi.type.tensor_type.elem_type, dims(vi)) for vi in ref.graph.output
    ]
    assert graph.op_types == {(n.domain, n.op_type) for n in ref.graph.node}
    assert graph.initializer_types == {t.data_type for t in ref.graph.initializer}


def test_onnx_variants_of_synthetic_models() -> None:
    from onnx import TensorProto, helper, numpy_helper

    fp16 = syn.onnx_relu(["N", 4], TensorProto.FLOAT16)
    assert detect_variant(fp16, "onnx") == "fp16"
    assert describe_model(fp16, "onnx")[0] == [{"name": "x", "dtype": "float16", "shape": [None, 4]}]

    # an int8 weight, cast to float: quantized storage without any Q/DQ node
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    w = numpy_helper.from_array(np.array([1, -2], np.int8), "w")
    nodes = [
        helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "wf"], ["y"]),
    ]
    assert detect_variant(syn.onnx_model([x], [y], nodes, [w]), "onnx") == "int8"

    # dynamic quantization: MatMulInteger on uint8 inputs
    a = helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 2])
    c = helper.make_tensor_value_info("c", TensorProto.INT32, [1, 2])
    b = numpy_helper.from_array(np.ones((2, 2), np.uint8), "b")
    mm = syn.onnx_model([a], [c], [helper.make_node("MatMulInteger", ["a", "b"], ["c"])], [b], opset=13)
    assert detect_variant(mm, "onnx") == "int8"
    assert Runtime().load(mm).infer({"a": np.ones((1, 2), np.uint8)})["c"].tolist() == [[2, 2]]

    assert detect_variant(syn.onnx_relu(["N", 4]), "onnx") == "fp32"


def test_tflite_variants_of_synthetic_models() -> None:
    assert detect_variant(syn.tflite_fp16_weights(), "tflite") == "fp16"
    assert detect_variant(syn.tflite_scalar_add(), "tflite") == "fp32"


def test_edgetpu_model_is_detected_and_litert_agrees_on_the_op(rt: Runtime) -> None:
    """No Edge TPU model ships in models/, so one is built: uint8 I/O around ``edgetpu-custom-op``.

    LiteRT without the Edge TPU delegate refuses it naming that very op, which shows the
    flatbuffer walk reads the same operator code LiteRT does.
    """
    data = syn.tflite_edgetpu()
    assert detect_variant(data, "tflite") == "edgetpu"
    inputs, _ = describe_model(data, "tflite")
    assert inputs == [
        {
            "name": "input",
            "dtype": "float32",
            "shape": [None, 8],
            "quantization": {"dtype": "uint8", "scale": 0.0078125, "zero_point": 128},
        }
    ]
    with pytest.raises(ModelError, match=r"unresolved custom op: edgetpu-custom-op") as err:
        rt.load(data)
    assert "coral-edgetpu" in (err.value.hint or "")


def test_sniff_refuses_what_is_neither_and_never_suggests_format() -> None:
    for payload in (b"hello world, not a model", b'{"not": "a model"}', b"\x89PNG\r\n\x1a\n" + bytes(64)):
        with pytest.raises(ModelError, match=r"model /data/m\.onnx is neither ONNX nor TFLite") as err:
            sniff_format(payload, "/data/m.onnx")
        assert "--format" not in str(err.value)
    with pytest.raises(ModelError, match=r"model <bytes> is empty"):
        sniff_format(b"")
    with pytest.raises(ModelError, match=r"is an encrypted edgert package") as err:
        sniff_format(b"EDGEPKG\0" + bytes(100), "m.edgepkg")
    assert "edgert package inspect m.edgepkg" in (err.value.hint or "")


def test_truncated_onnx_is_a_tie_the_suffix_breaks(models_dir: Path) -> None:
    data = (models_dir / "digits_small_int8.onnx").read_bytes()[:4000]
    assert _onnx_proto.looks_like_model(data) is None
    assert sniff_format(data, "m.onnx") == "onnx"
    assert sniff_format(data) == "onnx"
    assert sniff_format(data, "m.tflite") == "tflite"
    with pytest.raises(ModelError, match=r"cannot read the onnx model") as err:
        describe_model(data, "onnx")
    assert "truncated or corrupt" in (err.value.hint or "")


@pytest.mark.parametrize("name", ["digits_small_int8.onnx", "digits_small_int8io.tflite"])
def test_damaged_models_give_model_errors_only(models_dir: Path, name: str) -> None:
    """Truncations and smashed bytes: describe and detect either work or raise ModelError."""
    data = (models_dir / name).read_bytes()
    fmt = sniff_format(data, name)
    rng = np.random.default_rng(0)
    damaged = [data[:n] for n in rng.integers(0, len(data), 60)]
    for _ in range(200):
        buf = bytearray(data)
        for pos in rng.integers(0, len(buf), int(rng.integers(1, 16))):
            buf[pos] = int(rng.integers(0, 256))
        damaged.append(bytes(buf))
    errors = 0
    for bad in damaged:
        for fn in (describe_model, detect_variant):
            try:
                fn(bad, fmt)
            except ModelError:
                errors += 1
    assert errors > 0  # the damage is real enough to be noticed


def test_describe_is_pure() -> None:
    code = (
        "import sys, edgert.backends.describe as d\n"
        "bad = [m for m in sys.modules if m.startswith(('edgert.security', 'onnxruntime', 'ai_edge_litert', "
        "'tflite_runtime', 'onnx'))]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_model_fields_match_onnx_proto() -> None:
    """Sniffing trusts a list of ModelProto fields: pin it to the onnx package's own schema."""
    import onnx
    from google.protobuf.descriptor import FieldDescriptor as F

    wire = {F.TYPE_INT64: 0, F.TYPE_STRING: 2, F.TYPE_MESSAGE: 2}
    fields = {f.number: wire[f.type] for f in onnx.ModelProto.DESCRIPTOR.fields}
    assert fields == _onnx_proto.MODEL_FIELDS
