"""The real `tritonclient[http]` package against a real daemon: JSON and binary tensors both ways."""

from __future__ import annotations

import numpy as np
import pytest

from tests.serve.daemon_harness import MODELS

pytestmark = pytest.mark.integration

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is in the dev extra")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException


@pytest.fixture
def triton(served):
    client = httpclient.InferenceServerClient(url=served.daemon.addresses["http"], concurrency=1)
    yield client
    client.close()


@pytest.fixture(scope="module")
def expected(digits):
    from edgert import Runtime

    x, _ = digits
    model = Runtime("cpu-generic").load(MODELS / "digits_small_int8.onnx")
    try:
        return model.infer({"pixels": x[:8]})["logits"]
    finally:
        model.close()


def test_server_and_model_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("digits-small")
    meta = triton.get_model_metadata("digits-small")
    assert meta["inputs"][0]["name"] == "pixels" and meta["inputs"][0]["datatype"] == "FP32"
    assert {m["name"] for m in triton.get_model_repository_index()} >= {"digits-small", "digits-large"}


@pytest.mark.parametrize("binary_in", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("binary_out", [False, True], ids=["json-out", "binary-out"])
def test_infer_json_and_binary(triton, digits, expected, binary_in, binary_out):
    x, _ = digits
    inp = httpclient.InferInput("pixels", [8, 64], "FP32")
    inp.set_data_from_numpy(x[:8], binary_data=binary_in)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary_out)
    result = triton.infer("digits-small", [inp], outputs=[out], request_id="r-7")
    got = result.as_numpy("logits")
    assert got.shape == (8, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert result.get_response()["id"] == "r-7"


def test_cascade_without_output_selection(triton, digits):
    x, y = digits
    inp = httpclient.InferInput("pixels", [32, 64], "FP32")
    inp.set_data_from_numpy(x[:32], binary_data=True)
    logits = triton.infer("digits", [inp]).as_numpy("logits")
    assert (logits.argmax(1) == y[:32]).mean() > 0.85


def test_errors_surface_as_triton_exceptions(triton, digits):
    x, _ = digits
    inp = httpclient.InferInput("pixels", [1, 32], "FP32")
    inp.set_data_from_numpy(x[:1, :32])
    with pytest.raises(InferenceServerException, match="pixels"):
        triton.infer("digits-small", [inp])
    ok = httpclient.InferInput("pixels", [1, 64], "FP32")
    ok.set_data_from_numpy(x[:1])
    with pytest.raises(InferenceServerException, match="nope"):
        triton.infer("nope", [ok])
