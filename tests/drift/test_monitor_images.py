"""Image-shaped tensors take the per-channel path: a subsample per sample, the same alarms."""

from __future__ import annotations

import numpy as np

from edgert.drift import DriftMonitor, DriftSettings, ReferenceProfile, build_profile

W = np.random.default_rng(5).normal(size=(3 * 16 * 16, 4)).astype(np.float32)


def images(rng: np.random.Generator, n: int, brightness: float = 0.0, nhwc: bool = False) -> np.ndarray:
    x = (rng.normal(0.5, 0.2, size=(n, 3, 16, 16)) + brightness).astype(np.float32)
    x[:, 1] *= 0.5  # channels differ, so a per-channel profile matters
    return np.ascontiguousarray(np.moveaxis(x, 1, -1)) if nhwc else x


def scores(x: np.ndarray) -> np.ndarray:
    return (x.reshape(len(x), -1) @ W).astype(np.float32)


def test_nchw_and_nhwc_images_are_profiled_per_channel_and_shifts_trip() -> None:
    for nhwc in (False, True):
        rng = np.random.default_rng(0)
        ref = images(rng, 300, nhwc=nhwc)
        profile = ReferenceProfile.from_dict(build_profile({"image": ref}, {"logits": scores(ref)}).to_dict())
        p = profile.inputs["image"]
        assert (p.layout, p.features) == ("channel", 3)
        assert p.axis == (2 if nhwc else 0)
        settings = DriftSettings(window=200, min_samples=100, sample_every=1)
        same = DriftMonitor("cam", "1", profile, settings)
        brighter = DriftMonitor("cam", "1", profile, settings)
        for _ in range(50):
            a, b = images(rng, 4, nhwc=nhwc), images(rng, 4, 0.3, nhwc=nhwc)
            assert same.observe({"image": a}, {"logits": scores(a)}) is None
            brighter.observe({"image": b}, {"logits": scores(b)})
        assert same.headline()["psi"] < 0.1 and same.headline()["alarm"] == 0.0
        assert brighter.headline()["psi"] > 0.25 and brighter.alarms == 1
