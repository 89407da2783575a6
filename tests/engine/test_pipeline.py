"""Pipelines in the engine with real digits models: config, load-time checks, requests, swaps, metrics."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from edgert.config import parse_config
from edgert.engine import CascadeConfig, Engine, ModelConfig
from edgert.engine.pipeline_config import PipelineConfig
from edgert.errors import ConfigError, InputError, OverloadedError, UnknownModelError
from tests.runtime.synthetic import onnx_model

from .conftest import Instrumented, aio

MODELS_TOML = """
[daemon]
allow_plaintext = true
[[models]]
name = "d"
path = "models/digits_small_fp32.onnx"
[[models]]
name = "big"
path = "models/digits_large_int8.onnx"
[[cascades]]
name = "dc"
small = "d"
large = "big"
"""

DIGITS_PIPELINE = """
[[pipelines]]
name = "digits-top3"
input = { name = "pixels", dtype = "uint8", shape = [-1, 64] }
stages = [
  { op = "cast", dtype = "float32" },
  { op = "model", model = "d" },
  { op = "softmax" },
  { op = "topk", k = 3 },
]
outputs = ["classes", "probs"]
"""


def pipelines(text: str) -> tuple[PipelineConfig, ...]:
    return parse_config(MODELS_TOML + text, "p.toml").pipelines


def reference(x: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax then top-k, client-side."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(p, idx, axis=1)


def tiny_classifier(classes: int) -> bytes:
    """pixels float32 [N, 64] -> logits float32 [N, classes] (a MatMul): digits' input, other classes."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.linspace(-1, 1, 64 * classes, dtype=np.float32).reshape(64, classes), "w")
    x = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])
    return onnx_model([x], [y], [helper.make_node("MatMul", ["pixels", "w"], ["logits"])], [w])


@pytest.fixture
def served(engine: Engine, load) -> Engine:
    engine.add_model(load("digits_small_fp32.onnx", name="d"), ModelConfig("d"))
    engine.add_model(load("digits_large_int8.onnx", name="big"), ModelConfig("big"))
    engine.add_cascade(CascadeConfig("dc", "d", "big", "max_softmax", 0.9))
    return engine


def test_config_errors_name_file_key_and_allowed_values() -> None:
    bad = """
[[pipelines]]
name = "p"
input = { name = "x", dtype = "uint7", shape = [-1, 0] }
stages = [
  { op = "blur" },
  { op = "resize", height = 0 },
  { op = "transpose", layout = "NHWC->NCH" },
  { op = "model", model = "nope" },
  { op = "cascade", model = "d" },
  { op = "normalize", mean = [1, 2], std = [1, 0, 1] },
]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(MODELS_TOML + bad, "p.toml")
    text = str(info.value)
    for needle in [
        "p.toml: pipelines[0].input.dtype: got 'uint7' (allowed: float32",
        "pipelines[0].input.shape: is required",
        "pipelines[0].stages[0].op: got 'blur' (allowed: cast, scale",
        "pipelines[0].stages[1].height: must be an integer >= 1, got 0",
        "pipelines[0].stages[1].width: is required",
        "pipelines[0].stages[2].layout: layout must be like 'NHWC->NCHW'",
        "pipelines[0].stages[5].std: must be a non-empty list of finite positive numbers",
    ]:
        assert needle in text, (needle, text)
    with pytest.raises(ConfigError) as info:
        pipelines(DIGITS_PIPELINE.replace('model = "d"', 'model = "nope"'))
    assert "pipelines[0].stages[1].model: names 'nope', which is not one of the configured models " \
           "(allowed: big, d)" in str(info.value)
    with pytest.raises(ConfigError, match=r"topk.*must be last"):
        early = '{ op = "topk", k = 2 }, { op = "softmax" },'
        pipelines(DIGITS_PIPELINE.replace('{ op = "softmax" },', early))
    with pytest.raises(ConfigError, match="serves the name 'd' twice"):
        pipelines(DIGITS_PIPELINE.replace('name = "digits-top3"', 'name = "d"'))


def test_load_time_check_names_the_stage(served: Engine) -> None:
    with pytest.raises(ConfigError) as info:
        served.add_pipeline(pipelines(DIGITS_PIPELINE.replace('{ op = "cast", dtype = "float32" },', ""))[0])
    err = info.value
    assert err.message == ("pipeline 'digits-top3' stage 0 'd' (model): expected float32[?, 64] for "
                           "model 'd' input 'pixels', got uint8[?, 64]")
    assert 'op = "cast", dtype = "float32"' in (err.hint or "")
    with pytest.raises(ConfigError, match=r"stage 3 'topk' \(topk\): expected at least k=20 values"):
        served.add_pipeline(pipelines(DIGITS_PIPELINE.replace("k = 3", "k = 20"))[0])
    with pytest.raises(ConfigError, match="outputs lists 2 names but its last stage 'softmax' gives 1"):
        served.add_pipeline(pipelines(DIGITS_PIPELINE.replace('{ op = "topk", k = 3 },', ""))[0])
    assert "digits-top3" not in [m.name for m in served.models()]


@aio
async def test_requests_match_client_side_stages(served: Engine, digits) -> None:
    x, _ = digits
    served.add_pipeline(pipelines(DIGITS_PIPELINE)[0])
    info = served.get("digits-top3")
    assert info.kind == "pipeline" and [i.describe() for i in info.inputs] == ["pixels: uint8[?, 64]"]
    assert [o.describe() for o in info.outputs] == ["classes: int64[?, 3]", "probs: float32[?, 3]"]
    pixels = x[:16].astype(np.uint8)
    r = await served.infer("digits-top3", {"pixels": pixels})
    logits = (await served.infer("d", {"pixels": pixels.astype(np.float32)})).outputs["logits"]
    idx, probs = reference(pixels, logits, 3)
    np.testing.assert_array_equal(r.outputs["classes"], idx)
    np.testing.assert_allclose(r.outputs["probs"], probs, rtol=1e-6)
    sync = served.infer_sync("digits-top3", {"pixels": pixels}, outputs=["classes"])
    assert list(sync.outputs) == ["classes"] and r.model_version == "1"
    stages = served.metrics.snapshot()["models"]["digits-top3"]["stages"]
    assert {n: s["count"] for n, s in stages.items()} == {"cast": 2, "d": 2, "softmax": 2, "topk": 2}
    assert served.metrics.stats_copy("d")["requests"] == 3  # the member counts pipeline traffic too
    assert b'edgert_pipeline_stage_seconds_count{model="digits-top3",stage="topk"} 2' in \
        served.metrics.render_prometheus()


@aio
async def test_bad_requests_name_the_stage(served: Engine) -> None:
    served.add_pipeline(pipelines(DIGITS_PIPELINE)[0])
    with pytest.raises(InputError) as info:
        await served.infer("digits-top3", {"pixels": np.zeros((2, 64), np.float32)})
    assert info.value.message == ("pipeline 'digits-top3' input 'pixels': stage 0 'cast' (cast) expects "
                                  "uint8[?, 64], got float32[2, 64]")
    with pytest.raises(InputError, match="expects uint8\\[\\?, 64\\], got uint8\\[2, 63\\]"):
        await served.infer("digits-top3", {"pixels": np.zeros((2, 63), np.uint8)})
    with pytest.raises(InputError, match="expects one input 'pixels'"):
        await served.infer("digits-top3", {"x": np.zeros((2, 64), np.uint8)})
    with pytest.raises(UnknownModelError, match="no version '7'"):
        await served.infer("digits-top3", {"pixels": np.zeros((2, 64), np.uint8)}, version="7")
    errors = served.metrics.stats_copy("digits-top3")["errors"]
    assert errors == {"input": 3, "error": 1}
    # still serving
    ok = await served.infer("digits-top3", {"pixels": np.zeros((2, 64), np.uint8)})
    assert ok.outputs["classes"].shape == (2, 3)


@aio
async def test_cascade_stage_and_member_protection(served: Engine, digits) -> None:
    x, _ = digits
    served.add_pipeline(pipelines("""
[[pipelines]]
name = "dc-class"
input = { name = "pixels", dtype = "float32", shape = [-1, 64] }
stages = [{ op = "cascade", model = "dc" }, { op = "argmax" }]
""")[0])
    r = await served.infer("dc-class", {"pixels": x[:32]})
    direct = (await served.infer("dc", {"pixels": x[:32]})).outputs["logits"]
    np.testing.assert_array_equal(r.outputs["class"], direct.argmax(axis=1))
    assert r.model_version == "1+1"
    for member in ("dc", "d"):
        with pytest.raises(ConfigError, match="used by"):
            served.remove(member)
    served.remove("dc-class")
    served.remove("dc")
    with pytest.raises(UnknownModelError):
        served.get("dc-class")


@aio
async def test_member_swap_under_load_fails_nothing(engine: Engine, load, digits) -> None:
    x, _ = digits
    old = Instrumented(load("digits_small_fp32.onnx", name="d", version="1"))
    engine.add_model(old, ModelConfig("d", max_batch_size=8, max_queue_delay_us=200))
    engine.add_pipeline(pipelines(DIGITS_PIPELINE)[0])
    pixels = x.astype(np.uint8)
    versions: list[str] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        j = 0
        while not stop.is_set():
            try:
                r = await engine.infer("digits-top3", {"pixels": pixels[(i + j) % len(pixels)][None]})
                versions.append(r.model_version)
            except Exception as exc:
                failures.append(exc)
            j += 1
            await asyncio.sleep(0)

    tasks = asyncio.gather(*[client(i) for i in range(8)])
    while len(versions) < 100:
        await asyncio.sleep(0.001)
    await engine.swap("d", load("digits_small_int8.onnx", name="d", version="2"))
    after = len(versions)
    while len(versions) < after + 100:
        await asyncio.sleep(0.001)
    stop.set()
    await tasks
    assert failures == []
    assert "1" in versions and versions[-1] == "2" and engine.get("digits-top3").version == "2"
    assert old.closed == 1


@aio
async def test_swap_breaking_the_chain_is_refused(served: Engine, runtime) -> None:
    served.add_pipeline(pipelines(DIGITS_PIPELINE.replace("k = 3", "k = 5"))[0])
    three = runtime.load(tiny_classifier(3), name="d", version="2")
    with pytest.raises(ConfigError) as info:
        await served.swap("d", three)
    assert "cannot swap model 'd' to version '2': pipeline 'digits-top3' stage 3 'topk' (topk): expected " \
           "at least k=5 values on axis -1, got float32[?, 3]" in info.value.message
    assert served.get("d").version == "1"
    ten = runtime.load(tiny_classifier(10), name="d", version="3")
    await served.swap("d", ten)  # fits: served
    assert served.get("digits-top3").version == "3"


@aio
async def test_pipeline_in_flight_limit(engine: Engine, load, digits) -> None:
    x, _ = digits
    gated = Instrumented(load("digits_small_fp32.onnx", name="d"))
    engine.add_model(gated, ModelConfig("d", max_batch_size=4))  # runs on the batcher's thread
    one = DIGITS_PIPELINE.replace('name = "digits-top3"', 'name = "digits-top3"\nmax_in_flight = 1')
    engine.add_pipeline(pipelines(one)[0])
    gated.gate.clear()
    first = asyncio.ensure_future(engine.infer("digits-top3", {"pixels": x[:1].astype(np.uint8)}))
    while engine.progress()["d"].running == 0:  # the first request holds the pipeline's only slot
        await asyncio.sleep(0.001)
    with pytest.raises(OverloadedError, match="pipeline 'digits-top3' is overloaded") as info:
        await engine.infer("digits-top3", {"pixels": x[:1].astype(np.uint8)})
    assert info.value.retry_after > 0
    gated.gate.set()
    assert (await first).outputs["classes"].shape == (1, 3)
    assert engine.metrics.stats_copy("digits-top3")["errors"] == {"overloaded": 1}


@aio
async def test_swap_of_a_cascade_member_is_checked_through_the_cascade(served: Engine, runtime) -> None:
    served.add_pipeline(pipelines("""
[[pipelines]]
name = "dc-top5"
input = { name = "pixels", dtype = "float32", shape = [-1, 64] }
stages = [{ op = "cascade", model = "dc" }, { op = "topk", k = 5 }]
""")[0])
    with pytest.raises(ConfigError, match=r"cannot swap model 'd' to version '2': pipeline 'dc-top5' stage 1 "
                                          r"'topk' \(topk\): expected at least k=5"):
        await served.swap("d", runtime.load(tiny_classifier(3), name="d", version="2"))
    await served.swap("big", runtime.load(tiny_classifier(10), name="big", version="2"))  # fits: served
    assert served.get("dc-top5").version == "1+2"


@aio
async def test_numpy_only_signal_pipeline(engine: Engine) -> None:
    (p,) = pipelines("""
[[pipelines]]
name = "tone"
input = { name = "audio", dtype = "float32", shape = [-1, -1] }
stages = [
  { op = "scale", factor = 2.0 },
  { op = "logmel", size = 400, hop = 160, sample_rate = 16000, n_mels = 40 },
  { op = "scale", factor = 1.0, name = "identity" },
  { op = "cast", dtype = "float64" },
  { op = "cast", dtype = "float32" },
  { op = "argmax" },
]
""")
    assert [s.name for s in p.stages] == ["scale", "logmel", "identity", "cast-3", "cast-4", "argmax"]
    engine.add_pipeline(p)
    assert [o.describe() for o in engine.get("tone").outputs] == ["class: int64[?, ?]"]
    t = np.arange(16000) / 16000
    audio = np.stack([np.sin(2 * np.pi * f * t) for f in (300, 3000)]).astype(np.float32)
    r = await engine.infer("tone", {"audio": audio})
    assert r.model_version == "builtin" and r.outputs["class"].shape == (2, 98)
    low, high = (np.bincount(row).argmax() for row in r.outputs["class"])
    assert low < high  # the 3 kHz tone's loudest mel band is above the 300 Hz tone's
    with pytest.raises(InputError, match=r"stage 1 'logmel' \(logmel\) failed on float32\[2, 100\]"):
        await engine.infer("tone", {"audio": audio[:, :100]})
