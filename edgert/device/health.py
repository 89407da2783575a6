"""The Deployer's health step: a new version must run, give finite outputs and match its golden ones.

Pure apart from running the model: :func:`health_check` takes the loaded model and the package's golden
(inputs, outputs) and raises BackendError naming what failed; the Deployer (deployer.py) calls it
between load and swap, and again for shadow candidates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgert.errors import BackendError, EdgertError

__all__ = [
    "DEFAULT_MAX_WARM_LATENCY_S", "GOLDEN_ATOL", "GOLDEN_RTOL", "WARMUP_RUNS", "Golden", "health_check",
]

#: Warm-up runs of a new version before it takes traffic.
WARMUP_RUNS = 3
#: A new version whose median warm run takes longer than this fails its health check (seconds).
DEFAULT_MAX_WARM_LATENCY_S = 10.0
#: A health check's golden (inputs, outputs) by tensor name.
Golden = tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]]
#: Golden-output tolerance (absolute, relative) for the health check.
GOLDEN_ATOL = 1e-3
GOLDEN_RTOL = 1e-2


def health_check(model: Any, golden: Golden | None, max_latency_s: float) -> float:
    """Run ``model`` on zero inputs (and golden inputs, if any); return the median warm run (s).

    Raises BackendError when a run fails, an output is not finite, a golden output differs, or the
    warm run is slower than ``max_latency_s``.
    """
    from edgert.engine.served import warm_up

    try:
        seconds = warm_up(model, WARMUP_RUNS)
    except EdgertError as exc:
        raise BackendError(f"warm-up of model {model.name!r} version {model.version!r} failed its health "
                           f"check: {exc.message[:400]}",
                           hint="the version loads but cannot run here: check it was built for this "
                                "device's profile and onnxruntime/LiteRT version") from None
    if seconds > max_latency_s:
        raise BackendError(
            f"{model.name} {model.version}: warm run took {seconds * 1000:.1f} ms, over the "
            f"{max_latency_s * 1000:.0f} ms bound", hint="check the device profile and the model variant")
    zeros = {s.name: np.zeros([1 if d is None else d for d in s.shape], dtype=np.dtype(s.dtype))
             for s in model.inputs}
    outputs = model.run(zeros)
    for name, value in outputs.items():
        if np.asarray(value).dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise BackendError(f"{model.name} {model.version}: output {name!r} is not finite on zero inputs")
    if golden is not None:
        inputs, expected = golden
        got = model.run(dict(inputs))
        for name, want in expected.items():
            if name not in got or np.shape(got[name]) != np.shape(want) or not np.allclose(
                    got[name], want, atol=GOLDEN_ATOL, rtol=GOLDEN_RTOL):
                raise BackendError(f"{model.name} {model.version}: output {name!r} differs from the "
                                   "package's golden output", hint="the build or the variant is broken")
    return seconds
