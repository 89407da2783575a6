"""Built-in pipeline stages against independent numpy references, and their load-time shape checks."""

from __future__ import annotations

import numpy as np
import pytest

from edgert.backends.base import TensorSpec
from edgert.engine.signal_stages import LogMel, Window
from edgert.engine.stages import (
    Argmax,
    Cast,
    ModelStage,
    Normalize,
    Resize,
    Scale,
    Softmax,
    StageMismatch,
    Threshold,
    TopK,
    Transpose,
    layout_perm,
)

RNG = np.random.default_rng(7)


def spec(dtype: str, *shape: int | None) -> TensorSpec:
    return TensorSpec("x", np.dtype(dtype), tuple(shape))


def no_lookup(name: str):  # built-in stages never look models up
    raise AssertionError(name)


def bilinear_reference(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear interpolation with half-pixel centres, pixel by pixel (independent of stages.py)."""
    h, w = img.shape[:2]
    out = np.zeros((out_h, out_w, img.shape[2]), dtype=np.float64)
    for i in range(out_h):
        sy = min(max((i + 0.5) * h / out_h - 0.5, 0.0), h - 1)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = min(max((j + 0.5) * w / out_w - 0.5, 0.0), w - 1)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
            bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize(("src", "dst"), [((12, 16), (7, 9)), ((5, 5), (11, 8)), ((6, 6), (6, 6))])
def test_resize_matches_a_loop_reference(src: tuple[int, int], dst: tuple[int, int]) -> None:
    img = RNG.integers(0, 256, (*src, 3), dtype=np.uint8)
    (out,) = Resize("r", height=dst[0], width=dst[1]).run(img[None])
    assert out.dtype == np.float32 and out.shape == (1, *dst, 3)
    # float32 interpolation against a float64 reference: values are 0..255, so 1e-3 is float32 rounding.
    np.testing.assert_allclose(out[0], bilinear_reference(img.astype(np.float64), *dst), atol=1e-3)


def test_resize_chw_layout_and_shape_check() -> None:
    img = RNG.random((2, 3, 10, 14), dtype=np.float32)
    (out,) = Resize("r", height=5, width=7, layout="CHW").run(img)
    hwc = bilinear_reference(img[1].transpose(1, 2, 0).astype(np.float64), 5, 7)
    np.testing.assert_allclose(out[1].transpose(1, 2, 0), hwc, atol=1e-5)
    assert Resize("r", 5, 7, "CHW").check(spec("float32", None, 3, None, None), no_lookup)[0].shape == (
        None, 3, 5, 7)
    with pytest.raises(StageMismatch, match="rank 3 or 4"):
        Resize("r", 5, 7).check(spec("uint8", 10, 10), no_lookup)


def test_scale_normalize_transpose_cast() -> None:
    x = RNG.random((2, 4, 4, 3), dtype=np.float32) * 255
    (y,) = Scale("s", factor=1 / 255).run(x)
    np.testing.assert_allclose(y, x / 255, rtol=1e-6)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    (z,) = Normalize("n", tuple(mean), tuple(std)).run(y)
    np.testing.assert_allclose(z, (y - np.array(mean)) / np.array(std), rtol=1e-5, atol=1e-6)
    (t,) = Transpose("t", layout_perm("NHWC->NCHW")).run(z)
    assert t.flags.c_contiguous and t.shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(t, np.moveaxis(z, -1, 1))
    (c,) = Cast("c", "uint8").run(np.array([1.9, 250.2], dtype=np.float32))
    assert c.dtype == np.uint8 and c.tolist() == [1, 250]
    with pytest.raises(StageMismatch, match="float") as info:
        Scale("s").check(spec("uint8", 1, 4), no_lookup)
    assert "cast" in info.value.hint
    with pytest.raises(StageMismatch, match="3 channels"):
        Normalize("n", tuple(mean), tuple(std), axis=1).check(spec("float32", None, 224, 224, 3), no_lookup)
    with pytest.raises(ValueError, match="NHWC->NCHW"):
        layout_perm("NHWC->NCH")


def test_softmax_argmax_topk_threshold() -> None:
    x = RNG.normal(size=(3, 10)).astype(np.float32)
    x[0, 2] = x[0, 7] = x[0].max() + 1  # a tie: the lower index comes first
    (p,) = Softmax("s").run(x)
    e = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    np.testing.assert_allclose(p, e / e.sum(axis=1, keepdims=True), rtol=1e-5)
    (a,) = Argmax("a").run(p)
    assert a.tolist() == np.argmax(x, axis=1).tolist()
    idx, scores = TopK("k", k=4).run(p)
    assert idx[0, :2].tolist() == [2, 7]
    for row in range(3):
        assert idx[row].tolist() == sorted(range(10), key=lambda j: (-p[row, j], j))[:4]
        np.testing.assert_array_equal(scores[row], p[row, idx[row]])
    (m,) = Threshold("t", 0.2).run(p)
    assert m.dtype == np.bool_ and m.tolist() == (p >= 0.2).tolist()
    with pytest.raises(StageMismatch, match="k=11"):
        TopK("k", k=11).check(spec("float32", None, 10), no_lookup)
    assert Argmax("a").check(spec("float32", None, 10), no_lookup)[0].shape == (None,)


def test_window_and_logmel() -> None:
    sr, size, hop, mels = 16000, 400, 160, 40
    t = np.arange(sr // 2) / sr
    signal = np.sin(2 * np.pi * 1000 * t).astype(np.float32)[None]
    (frames,) = Window("w", size, hop).run(signal)
    n = 1 + (signal.shape[1] - size) // hop
    assert frames.shape == (1, n, size)
    np.testing.assert_array_equal(frames[0, 3], signal[0, 3 * hop:3 * hop + size])
    (feat,) = LogMel("m", size, hop, sample_rate=sr, n_mels=mels).run(signal)
    assert feat.shape == (1, n, mels) and feat.dtype == np.float32
    # Independent check: the loudest mel band holds 1 kHz (HTK mel scale, band centres).
    edges = 700 * (10 ** (np.linspace(0, 2595 * np.log10(1 + 8000 / 700), mels + 2) / 2595) - 1)
    loudest = int(np.argmax(feat[0].mean(axis=0)))
    assert edges[loudest] <= 1000 <= edges[loudest + 2]
    with pytest.raises(StageMismatch, match="at least 400 samples"):
        LogMel("m", size, hop).check(spec("float32", None, 100), no_lookup)


def test_model_stage_check_names_what_to_add() -> None:
    want = TensorSpec("input", np.dtype("float32"), (None, 3, 224, 224))
    out = TensorSpec("logits", np.dtype("float32"), (None, 1000))

    def lookup(name: str):
        return (want,), (out,)

    stage = ModelStage("m", "mobilenetv2")
    assert stage.check(spec("float32", None, 3, 224, 224), lookup) == (out,)
    with pytest.raises(StageMismatch) as info:
        stage.check(spec("uint8", None, 3, 224, 224), lookup)
    assert "cast" in info.value.hint and "float32[?, 3, 224, 224]" in info.value.expected
    with pytest.raises(StageMismatch) as info:
        stage.check(spec("float32", None, 224, 224, 3), lookup)
    assert "transpose" in info.value.hint
    with pytest.raises(StageMismatch) as info:
        stage.check(spec("float32", None, 3, 200, 200), lookup)
    assert "resize" in info.value.hint
    with pytest.raises(StageMismatch, match="output 'probs'"):
        ModelStage("m", "mobilenetv2", output="probs").check(spec("float32", None, 3, 224, 224), lookup)
