"""Pipelines in a real daemon: MobileNetV2 with server-side pre/post-processing over HTTP (JSON and binary)
and the Unix socket, bad input, configs whose chain does not fit, and member hot swaps through the Deployer.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.config import parse_config
from edgert.device.importing import import_plaintext
from edgert.errors import ConfigError, InputError
from edgert.security.loader import open_keystore, open_store
from tests.device.subproc import cli
from tests.engine.test_pipeline import tiny_classifier
from tests.serve.daemon_harness import MODELS, config_text, start_daemon

pytestmark = pytest.mark.integration

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PIPELINE = f"""
[[models]]
name = "mobilenetv2"
path = "{MODELS / "mobilenetv2_int8.onnx"}"
[[pipelines]]
name = "mnv2-top5"
input = {{ name = "frame", dtype = "uint8", shape = [-1, -1, -1, 3] }}
stages = [
  {{ op = "resize", height = 224, width = 224 }},
  {{ op = "transpose", layout = "NHWC->NCHW" }},
  {{ op = "scale", factor = 0.00392156862745098 }},
  {{ op = "normalize", mean = {list(MEAN)}, std = {list(STD)}, axis = 1 }},
  {{ op = "model", model = "mobilenetv2" }},
  {{ op = "softmax" }},
  {{ op = "topk", k = 5 }},
]
"""


def client_preprocess(frames: np.ndarray) -> np.ndarray:
    """What a client does without the pipeline: uint8 NHWC frames -> float32 NCHW 224x224, in numpy.

    Bilinear with half-pixel centres (the documented resize; tests/engine/test_pipeline_stages.py checks the
    server's resize against a pixel-by-pixel reference), in float32, rows then columns.
    """
    x = frames.astype(np.float32)
    for axis, size in ((1, 224), (2, 224)):
        n = x.shape[axis]
        if n != size:
            pos = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
            lo = np.floor(pos).astype(int)
            hi = np.minimum(lo + 1, n - 1)
            w = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(4)])
            a, b = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
            x = a + (b - a) * w
    x = x * np.float32(0.00392156862745098)
    x = (x - np.array(MEAN, np.float32)) * (1 / np.array(STD)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def client_postprocess(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax and top-5 (largest first, ties by index) on the client."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :5]
    return idx, np.take_along_axis(p, idx, axis=1)


def json_infer(url: str, model: str, name: str, x: np.ndarray) -> tuple[int, dict]:
    """OIP JSON (no binary extension) with http.client."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"inputs": [{"name": name, "datatype": "UINT8", "shape": list(x.shape),
                                   "data": x.reshape(-1).tolist()}]})
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body, {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def mnv2(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("mnv2")
    running = start_daemon(parse_config(config_text(tmp, models=PIPELINE), "pipeline.toml"))
    yield running
    running.stop()


def test_metadata_shows_the_pipelines_own_signature(mnv2) -> None:
    with Client(mnv2.http_url) as c:
        meta = c.metadata("mnv2-top5")
        assert "mnv2-top5" in c.models()
    assert meta["inputs"] == [{"name": "frame", "datatype": "UINT8", "shape": [-1, -1, -1, 3]}]
    assert meta["outputs"] == [{"name": "indices", "datatype": "INT64", "shape": [-1, 5]},
                               {"name": "scores", "datatype": "FP32", "shape": [-1, 5]}]
    assert meta["platform"] == "pipeline"


@pytest.mark.parametrize("shape", [(1, 240, 320, 3), (2, 224, 224, 3)])
def test_output_equals_client_side_stages(mnv2, shape: tuple[int, ...]) -> None:
    frames = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    with Client("unix://" + mnv2.socket) as c:
        logits = c.infer("mobilenetv2", {"input": client_preprocess(frames)})["logits"]
        want_idx, want_scores = client_postprocess(logits)
        over_socket = c.infer("mnv2-top5", {"frame": frames})
    with Client(mnv2.http_url) as c:
        over_binary = c.infer("mnv2-top5", {"frame": frames})
    status, doc = json_infer(mnv2.http_url, "mnv2-top5", "frame", frames)
    assert status == 200, doc
    outs = {o["name"]: np.asarray(o["data"]).reshape(o["shape"]) for o in doc["outputs"]}
    for got in (over_socket, over_binary, outs):
        # The client repeats the server's float32 arithmetic in the same order, so the model sees the same
        # input and the indices are equal; scores differ at most by float32 rounding of the softmax (and
        # JSON's decimal round trip), hence rtol 1e-6.
        np.testing.assert_array_equal(got["indices"], want_idx)
        np.testing.assert_allclose(got["scores"], want_scores, rtol=1e-6)
    assert over_socket["indices"].dtype == np.int64 and over_socket["scores"].dtype == np.float32


def test_bad_input_names_the_stage_and_the_daemon_keeps_serving(mnv2) -> None:
    frame = np.zeros((1, 224, 224, 3), np.uint8)
    for url in (mnv2.http_url, "unix://" + mnv2.socket):
        with Client(url) as c:
            wrong = r"stage 0 'resize' \(resize\) expects uint8\[\?, \?, \?, 3\], got float32\[1, 224, 224, 3"
            with pytest.raises(InputError, match=wrong):
                c.infer("mnv2-top5", {"frame": frame.astype(np.float32)})
            with pytest.raises(InputError, match=r"expects uint8\[\?, \?, \?, 3\], got uint8\[224, 224, 3\]"):
                c.infer("mnv2-top5", {"frame": frame[0]})
            with pytest.raises(InputError, match=r"got uint8\[1, 224, 224, 4\]"):
                c.infer("mnv2-top5", {"frame": np.zeros((1, 224, 224, 4), np.uint8)})
            assert c.infer("mnv2-top5", {"frame": frame})["indices"].shape == (1, 5)
    status, doc = json_infer(mnv2.http_url, "mnv2-top5", "frame", frame[0])
    assert status == 400 and "stage 0 'resize'" in doc["error"]
    metrics = mnv2.daemon.engine.metrics.snapshot()["models"]["mnv2-top5"]
    assert metrics["errors"]["input"] >= 7 and metrics["stages"]["mobilenetv2"]["count"] >= 2


BAD_CHAIN = PIPELINE.replace("height = 224, width = 224", "height = 200, width = 200")


def test_a_chain_that_does_not_fit_is_refused_at_check_and_at_load(tmp_path: Path) -> None:
    text = config_text(tmp_path, models=BAD_CHAIN)
    expected = ("pipeline 'mnv2-top5' stage 4 'mobilenetv2' (model): expected float32[?, 3, 224, 224] for "
                "model 'mobilenetv2' input 'input', got float32[?, 3, 200, 200]")
    (tmp_path / "bad.toml").write_text(text)
    check = cli("daemon", "--check", "--config", str(tmp_path / "bad.toml"))
    assert check.returncode != 0
    assert expected in check.stdout + check.stderr
    good = tmp_path / "good"
    good.mkdir()
    (good / "good.toml").write_text(config_text(good, models=PIPELINE))
    ok = cli("daemon", "--check", "--config", str(good / "good.toml"))
    assert "pipeline mnv2-top5" in ok.stdout and "frame uint8[?, ?, ?, 3] -> indices int64[?, 5]" in ok.stdout
    with pytest.raises(ConfigError) as info:
        start_daemon(parse_config(text, "bad.toml"))
    assert info.value.message == expected and "resize" in (info.value.hint or "")


DIGITS_PIPELINE = """
[[models]]
name = "digits"
[[pipelines]]
name = "digits-top3"
input = { name = "pixels", dtype = "uint8", shape = [-1, 64] }
stages = [
  { op = "cast", dtype = "float32" },
  { op = "model", model = "digits" },
  { op = "softmax" },
  { op = "topk", k = 3 },
]
"""


def wait_for(condition, timeout: float = 60.0) -> None:
    """Poll ``condition`` until true (generous timeout; no fixed sleeps as the test's logic)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_member_swap_through_the_deployer(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(state, open_keystore(state, create=True))
    import_plaintext(store, MODELS / "digits_small_fp32.onnx", name="digits", version="1")
    text = config_text(tmp_path, models=DIGITS_PIPELINE).replace(
        "allow_plaintext = true", f'state_dir = "{state}"')
    running = start_daemon(parse_config(text, "swap.toml"))
    x = np.load(MODELS / "digits_test.npz")["x"][:8].astype(np.uint8)
    stop = threading.Event()
    failures: list[BaseException] = []
    versions: list[str] = []

    def hammer(url: str) -> None:
        try:
            with Client(url) as c:
                while not stop.is_set():
                    assert c.infer("digits-top3", {"pixels": x})["indices"].shape == (8, 3)
                    versions.append(c.metadata("digits-top3")["versions"][0])
        except BaseException as exc:
            failures.append(exc)

    urls = [running.http_url, "unix://" + running.socket]
    threads = [threading.Thread(target=hammer, args=(u,)) for u in urls]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(versions) >= 20 or bool(failures))
        import_plaintext(store, MODELS / "digits_small_int8.onnx", name="digits", version="2", activate=False)
        with Client("unix://" + running.socket) as c:
            c.load("digits", "2")  # the Deployer: floor, load, health, swap (chain checked), commit
            assert c.metadata("digits-top3")["versions"] == ["2"]
        count = len(versions)
        wait_for(lambda: len(versions) >= count + 20 or bool(failures))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        running.stop()
    assert failures == []
    assert versions[-1] == "2" and "1" in versions


def test_member_swap_that_breaks_the_chain_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = open_store(state, open_keystore(state, create=True))
    import_plaintext(store, MODELS / "digits_small_fp32.onnx", name="digits", version="1")
    three = tmp_path / "three.onnx"
    three.write_bytes(tiny_classifier(3))
    import_plaintext(store, three, name="digits", version="2", activate=False)
    text = config_text(tmp_path, models=DIGITS_PIPELINE.replace("k = 3", "k = 5")).replace(
        "allow_plaintext = true", f'state_dir = "{state}"')
    running = start_daemon(parse_config(text, "swap.toml"))
    x = np.load(MODELS / "digits_test.npz")["x"][:4].astype(np.uint8)
    try:
        with Client("unix://" + running.socket) as c:
            before = c.infer("digits-top3", {"pixels": x})
            refused = r"cannot swap model 'digits' to version '2': pipeline 'digits-top3' stage 3 'topk'"
            with pytest.raises(Exception, match=refused + r" \(topk\): expected at least k=5"):
                c.load("digits", "2")
            assert c.metadata("digits")["versions"] == ["1"]
            after = c.infer("digits-top3", {"pixels": x})
            np.testing.assert_array_equal(after["indices"], before["indices"])
        assert store.entry("digits").active == "1"  # nothing committed
    finally:
        running.stop()


def test_stage_times_on_the_metrics_endpoint(mnv2) -> None:
    with Client("unix://" + mnv2.socket) as c:
        c.infer("mnv2-top5", {"frame": np.zeros((1, 64, 64, 3), np.uint8)})
    host, port = mnv2.daemon.addresses["metrics"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    for stage in ("resize", "transpose", "scale", "normalize", "mobilenetv2", "softmax", "topk"):
        prefix = f'edgert_pipeline_stage_seconds_count{{model="mnv2-top5",stage="{stage}"}}'
        line = next(ln for ln in text.splitlines() if ln.startswith(prefix))
        assert int(line.rsplit(" ", 1)[1]) >= 1
    assert 'kind="pipeline"' in text


def test_repository_unload_and_load_of_a_pipeline(mnv2) -> None:
    frame = np.zeros((1, 224, 224, 3), np.uint8)
    with Client(mnv2.http_url) as c:
        c.unload("mnv2-top5")
        assert "mnv2-top5" not in c.models()
        with pytest.raises(Exception, match="unknown model 'mnv2-top5'"):
            c.infer("mnv2-top5", {"frame": frame})
        c.load("mnv2-top5")
        with pytest.raises(Exception, match=r"used by pipeline\(s\) \['mnv2-top5'\]"):
            c.unload("mobilenetv2")
    with Client("unix://" + mnv2.socket) as c:
        c.unload("mnv2-top5")
        c.unload("mobilenetv2")
        c.load("mnv2-top5")  # brings its member back first
        assert {"mnv2-top5", "mobilenetv2"} <= set(c.models())
        assert c.infer("mnv2-top5", {"frame": frame})["indices"].shape == (1, 5)


def test_reload_adds_changes_and_removes_pipelines(tmp_path: Path) -> None:
    path = tmp_path / "edgert.toml"
    digits = f"""
[[models]]
name = "digits"
path = "{MODELS / "digits_small_int8.onnx"}"
"""
    top = DIGITS_PIPELINE.split("[[pipelines]]")[1].replace('[[models]]\nname = "digits"\n', "")
    path.write_text(config_text(tmp_path, models=digits))
    running = start_daemon(parse_config(path.read_text(), str(path)), config_path=path)
    x = np.load(MODELS / "digits_test.npz")["x"][:4].astype(np.uint8)
    try:
        path.write_text(config_text(tmp_path, models=digits + "[[pipelines]]" + top))
        running.call(running.daemon.reload())
        with Client("unix://" + running.socket) as c:
            assert c.infer("digits-top3", {"pixels": x})["indices"].shape == (4, 3)
        top2 = top.replace("k = 3", "k = 2")
        path.write_text(config_text(tmp_path, models=digits + "[[pipelines]]" + top2))
        running.call(running.daemon.reload())
        with Client("unix://" + running.socket) as c:
            assert c.infer("digits-top3", {"pixels": x})["indices"].shape == (4, 2)
        # a reload adding a pipeline whose chain does not fit: it is refused, the other one still serves
        bad = top.replace("digits-top3", "digits-top20").replace("k = 3", "k = 20")
        path.write_text(config_text(tmp_path, models=digits + "[[pipelines]]" + top + "[[pipelines]]" + bad))
        running.call(running.daemon.reload())
        with Client("unix://" + running.socket) as c:
            assert "digits-top20" not in c.models()
            assert c.infer("digits-top3", {"pixels": x})["indices"].shape == (4, 3)
        path.write_text(config_text(tmp_path, models=digits))
        running.call(running.daemon.reload())
        with Client("unix://" + running.socket) as c:
            assert "digits-top3" not in c.models() and "digits" in c.models()
    finally:
        running.stop()


def test_tritonclient_sees_one_model(mnv2) -> None:
    httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
    frames = np.random.default_rng(3).integers(0, 256, (1, 240, 320, 3), dtype=np.uint8)
    client = httpclient.InferenceServerClient(url=mnv2.daemon.addresses["http"], concurrency=1)
    try:
        assert client.is_model_ready("mnv2-top5")
        meta = client.get_model_metadata("mnv2-top5")
        assert [i["name"] for i in meta["inputs"]] == ["frame"]
        inp = httpclient.InferInput("frame", list(frames.shape), "UINT8")
        inp.set_data_from_numpy(frames, binary_data=True)
        outs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in ("indices", "scores")]
        result = client.infer("mnv2-top5", [inp], outputs=outs)
    finally:
        client.close()
    with Client("unix://" + mnv2.socket) as c:
        want = c.infer("mnv2-top5", {"frame": frames})
    np.testing.assert_array_equal(result.as_numpy("indices"), want["indices"])
    np.testing.assert_array_equal(result.as_numpy("scores"), want["scores"])


def test_a_stream_runs_through_the_pipeline(mnv2) -> None:
    """Streams are bound to a served name, so a pipeline streams like a model (issue 13)."""
    frames = np.random.default_rng(7).integers(0, 256, (5, 240, 320, 3), dtype=np.uint8)
    with Client("unix://" + mnv2.socket) as c:
        items = [(f"f{i}", float(i), frames[i]) for i in range(5)]
        results = list(c.stream("mnv2-top5", items, policy="all"))
        want = [c.infer("mnv2-top5", {"frame": frames[i : i + 1]}) for i in range(5)]
    assert [r.id for r in results] == [f"f{i}" for i in range(5)]
    assert all(r.error is None and r.dropped == 0 for r in results), [r.error for r in results]
    for got, expected in zip(results, want, strict=True):
        np.testing.assert_array_equal(got.outputs["indices"], expected["indices"])
        np.testing.assert_allclose(got.outputs["scores"], expected["scores"], rtol=1e-6)
