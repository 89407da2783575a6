"""Compute a model's reference profile by running it on reference data (the adapter around profile.py).

``data.npz`` holds the reference inputs: one array per model input, named after it; a model with
one input also accepts a single array under any name, or an array named ``x`` (other arrays, such
as labels ``y`` in ``models/digits_test.npz``, are ignored). The
model runs on the data in batches of :data:`PROFILE_BATCH` (one row at a time when its batch
dimension is fixed), and :func:`edgert.drift.profile.build_profile` summarizes inputs and outputs.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgert.drift.profile import MAX_PROFILE_BYTES, ReferenceProfile, build_profile
from edgert.errors import ModelError

__all__ = ["PROFILE_BATCH", "load_reference_data", "profile_model_file"]

#: Reference rows run through the model at once.
PROFILE_BATCH = 256
#: Most reference rows used (a seeded subsample beyond this; the profile's error is far below drift).
MAX_REFERENCE_ROWS = 20_000
_HINT = "save it with numpy.savez(PATH, **{input_name: array}) (one array per model input)"


def load_reference_data(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """The reference inputs in ``path`` (.npz), by model input name; ModelError says what is missing."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            arrays = {k: np.asarray(data[k]) for k in data.files}
    except FileNotFoundError:
        raise ModelError(f"reference data {path} does not exist", hint=_HINT) from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelError(f"reference data {path} is not a readable .npz file ({exc})", hint=_HINT) from None
    if len(input_names) == 1 and input_names[0] not in arrays:
        if len(arrays) == 1:
            return {input_names[0]: next(iter(arrays.values()))}
        if "x" in arrays:
            return {input_names[0]: arrays["x"]}
    missing = [n for n in input_names if n not in arrays]
    if missing:
        raise ModelError(f"reference data {path} has no array for model input(s) {missing} "
                         f"(it holds {sorted(arrays)})", hint=_HINT)
    return {n: arrays[n] for n in input_names}


def _subsample(data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = min(a.shape[0] for a in data.values())
    if n <= MAX_REFERENCE_ROWS:
        return data
    keep = np.sort(np.random.default_rng(0).permutation(n)[:MAX_REFERENCE_ROWS])
    return {k: v[keep] for k, v in data.items()}


def profile_model_file(model_path: Path, data_path: Path, *, runtime: Any = None) -> dict[str, Any]:
    """Run the model file on the reference data; return the profile document for the manifest."""
    from edgert.runtime import Runtime

    model = (runtime or Runtime()).load(Path(model_path), name="reference", version="1")
    try:
        data = _subsample(load_reference_data(data_path, [s.name for s in model.inputs]))
        fixed = any(s.shape and s.shape[0] is not None for s in model.inputs)
        step = 1 if fixed else min(PROFILE_BATCH, model.max_batch or PROFILE_BATCH)
        n = min(a.shape[0] for a in data.values())
        parts: dict[str, list[np.ndarray]] = {}
        for start in range(0, n, step):
            batch = model.validate({k: v[start:start + step] for k, v in data.items()})
            for name, out in model.run(batch).items():
                parts.setdefault(name, []).append(np.asarray(out))
        outputs = {k: np.concatenate(v) for k, v in parts.items()}
        inputs = {k: np.asarray(v[:n]) for k, v in data.items()}
    finally:
        model.close()
    doc = build_profile(inputs, outputs).to_dict()
    size = len(repr(doc))
    if size > MAX_PROFILE_BYTES:
        raise ModelError(f"the reference profile of {model_path} is {size} bytes (limit {MAX_PROFILE_BYTES})",
                         hint="the model has too many inputs or outputs to profile")
    ReferenceProfile.from_dict(doc)  # what devices will parse
    return doc
