"""Make or read input tensors for ``edgert infer`` and ``edgert bench``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgert.backends.base import TensorSpec
from edgert.errors import InputError


def parse_shapes(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1,3,224,224`` options."""
    shapes: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise InputError(f"--shape {item!r}: expected NAME=D1,D2,... e.g. pixels=1,64") from None
    return shapes


def concrete_shape(spec: TensorSpec, batch: int, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape to generate: ``--shape`` if given, else batch for dim 0 and 1 for other dynamic dims."""
    if spec.name in shapes:
        return shapes[spec.name]
    return tuple((batch if i == 0 else 1) if d is None else d for i, d in enumerate(spec.shape))


def random_inputs(
    specs: Sequence[TensorSpec],
    batch: int = 1,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random inputs matching ``specs``."""
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = concrete_shape(spec, batch, shapes or {})
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            out[spec.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            info = np.iinfo(dtype)
            out[spec.name] = rng.integers(max(info.min, -8), min(info.max, 8), shape, endpoint=True).astype(
                dtype
            )
    return out


def load_inputs(paths: Sequence[str], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Read ``--input`` values: ``file.npy`` (single-input model), ``name=file.npy`` or ``file.npz``."""
    out: dict[str, np.ndarray] = {}
    for item in paths:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = "", item
        path = Path(file)
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    out.update({k: npz[k] for k in npz.files})
                continue
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"input file {path} does not exist") from None
        except (ValueError, OSError) as exc:
            raise InputError(f"input file {path} is not a readable .npy/.npz file: {exc}") from None
        if not name:
            if len(specs) != 1:
                names = ", ".join(s.name for s in specs)
                raise InputError(
                    f"the model has {len(specs)} inputs ({names}); name them: --input NAME=FILE.npy"
                )
            name = specs[0].name
        out[name] = arr
    return out
