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
    if not spec.rank_known:
        raise InputError(
            f"input {spec.name!r} is declared without a shape, so random data needs one",
            hint=f"give it with --shape {spec.name}=D1,D2,... e.g. --shape {spec.name}={batch},64",
        )
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


#: First bytes of the files ``--input`` reads (the .npy format header; a .npz is a zip archive).
NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK\x03\x04"


def _check_magic(path: Path) -> None:
    """Refuse anything that is not a .npy or .npz before numpy reads it.

    np.load falls back to unpickling unknown content, so a text or CSV file named .npy would
    otherwise fail with numpy's advice to allow pickles, which must never be followed here.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"input file {path} is a directory, not a .npy/.npz file") from None
    except OSError as exc:
        raise InputError(f"cannot read input file {path}: {exc.strerror}") from None
    if head.startswith(NPY_MAGIC) or head.startswith(ZIP_MAGIC):
        return
    looks = "text" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "something else"
    raise InputError(
        f"input file {path} is not a NumPy .npy/.npz file (it has no NumPy header; it looks like {looks})",
        hint="save arrays with numpy.save('x.npy', array) or numpy.savez('inputs.npz', name=array); "
        "convert text first: numpy.save('x.npy', numpy.loadtxt('x.csv', delimiter=',', dtype='float32'))",
    )


def load_inputs(paths: Sequence[str], specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Read ``--input`` values: ``file.npy`` (single-input model), ``name=file.npy`` or ``file.npz``."""
    out: dict[str, np.ndarray] = {}
    for item in paths:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = "", item
        path = Path(file)
        _check_magic(path)
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as npz:
                    out.update({k: npz[k] for k in npz.files})
                continue
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"input file {path} does not exist") from None
        except (ValueError, OSError) as exc:
            if "allow_pickle" in str(exc):  # an object array: never unpickle untrusted input
                raise InputError(
                    f"input file {path} holds Python objects (dtype=object), not numbers",
                    hint="save a numeric array, e.g. numpy.save('x.npy', numpy.asarray(x, dtype='float32'))",
                ) from None
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
