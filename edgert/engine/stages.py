"""Built-in pipeline stages: numpy-only pre- and post-processing, each with a load-time shape check.

Every stage takes one tensor. :meth:`check` maps the incoming :class:`TensorSpec` (``None`` marks a
dynamic dimension) to the specs it produces, or raises :class:`StageMismatch` saying what it expected,
what it got and how to fix the chain; :meth:`run` does the work on an array. Only the last stage of a
pipeline may produce more than one tensor (``topk``: indices and scores).

Signal stages (window, logmel) are in :mod:`edgert.engine.signal_stages`. Model and cascade stages
(:class:`ModelStage`) run through the engine, not here: :mod:`edgert.engine.pipeline` sends them
through ``Engine.infer`` so they get admission control, batching and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgert.backends.base import TensorSpec

__all__ = [
    "CAST_DTYPES",
    "BuiltinStage",
    "Cast",
    "Normalize",
    "Resize",
    "Scale",
    "Softmax",
    "Stage",
    "StageMismatch",
    "Threshold",
    "TopK",
    "Transpose",
    "describe",
    "make_spec",
    "need_float",
]

#: dtypes a ``cast`` stage may produce (the OIP datatypes numpy can hold).
CAST_DTYPES = ("float32", "float16", "float64", "uint8", "int8", "int16", "int32", "int64", "bool")

#: ``lookup(name) -> (inputs, outputs)`` of a served model or cascade; raises when it is not served.
Lookup = Callable[[str], tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]]


class StageMismatch(Exception):
    """A stage cannot take the tensor the previous stage gives it (internal: the pipeline names it)."""

    def __init__(self, expected: str, got: str, hint: str) -> None:
        super().__init__(f"expected {expected}, got {got}")
        self.expected, self.got, self.hint = expected, got, hint


def describe(dtype: Any, shape: tuple[int | None, ...]) -> str:
    """``uint8[?, 224, 224, 3]`` style text."""
    return f"{np.dtype(dtype).name}[{', '.join('?' if d is None else str(d) for d in shape)}]"


def make_spec(name: str, dtype: Any, shape: tuple[int | None, ...]) -> TensorSpec:
    """A TensorSpec from a dtype-like and a shape."""
    return TensorSpec(name, np.dtype(dtype), tuple(shape))


def need_float(stage: str, spec: TensorSpec) -> None:
    """Raise StageMismatch (hint: add a cast) unless ``spec`` is a float tensor."""
    if np.dtype(spec.dtype).kind != "f":
        raise StageMismatch("a float tensor", describe(spec.dtype, spec.shape),
                            f'add {{ op = "cast", dtype = "float32" }} before {stage}')


def _axis(axis: int, spec: TensorSpec, stage: str) -> int:
    rank = len(spec.shape)
    if not -rank <= axis < rank:
        raise StageMismatch(f"a tensor with axis {axis}", f"rank {rank} ({describe(spec.dtype, spec.shape)})",
                            f"set {stage}'s axis within -{rank}..{rank - 1}")
    return axis % rank


@dataclass(frozen=True)
class BuiltinStage:
    """Base of the numpy stages: ``name`` labels it in errors and metrics."""

    op: ClassVar[str] = ""
    name: str

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Specs this stage produces from ``spec``; raises StageMismatch."""
        raise NotImplementedError

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Apply the stage."""
        raise NotImplementedError

    def output_names(self) -> tuple[str, ...]:
        """Default names of the tensors this stage produces when it ends a pipeline."""
        return ("output",)


@dataclass(frozen=True)
class Cast(BuiltinStage):
    """Convert to ``dtype`` (float to integer truncates, as numpy's astype)."""

    op: ClassVar[str] = "cast"
    dtype: str = "float32"

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Same shape, new dtype."""
        return (make_spec(spec.name, self.dtype, spec.shape),)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """``x.astype(dtype)``."""
        return (x.astype(self.dtype, copy=False),)


@dataclass(frozen=True)
class Scale(BuiltinStage):
    """``x * factor + offset`` on a float tensor."""

    op: ClassVar[str] = "scale"
    factor: float = 1.0
    offset: float = 0.0

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Float in, same spec out."""
        need_float(self.name, spec)
        return (spec,)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Scale and shift in the input's dtype."""
        y = x * x.dtype.type(self.factor)
        if self.offset:
            y += x.dtype.type(self.offset)
        return (y,)


@dataclass(frozen=True)
class Normalize(BuiltinStage):
    """``(x - mean) / std`` per channel along ``axis`` (one value each applies to every channel)."""

    op: ClassVar[str] = "normalize"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    axis: int = -1

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Float in, same spec out; the channel axis must match mean and std."""
        need_float(self.name, spec)
        axis = _axis(self.axis, spec, self.name)
        channels = max(len(self.mean), len(self.std))
        if channels > 1 and spec.shape[axis] != channels:
            got = "a dynamic size" if spec.shape[axis] is None else str(spec.shape[axis])
            raise StageMismatch(f"{channels} channels on axis {self.axis}",
                                f"{got} ({describe(spec.dtype, spec.shape)})",
                                "set axis to the channel axis, or give one mean/std per channel")
        return (spec,)

    def _params(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shape = [1] * x.ndim
        shape[self.axis % x.ndim] = -1
        mean = np.asarray(self.mean, dtype=x.dtype).reshape(shape)
        inv = (1.0 / np.asarray(self.std, dtype=np.float64)).astype(x.dtype).reshape(shape)
        return mean, inv

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Subtract the mean, multiply by 1/std."""
        mean, inv = self._params(x)
        return ((x - mean) * inv,)


@dataclass(frozen=True)
class Resize(BuiltinStage):
    """Bilinear resize (half-pixel centres, as OpenCV INTER_LINEAR) of HWC/NHWC or CHW/NCHW images.

    Integer images are interpolated in float32 and come out as float32; float images keep their dtype.
    """

    op: ClassVar[str] = "resize"
    height: int = 224
    width: int = 224
    layout: str = "HWC"  # "HWC": H, W are axes -3, -2; "CHW": -2, -1

    def _axes(self) -> tuple[int, int]:
        return (-3, -2) if self.layout == "HWC" else (-2, -1)

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """An image of rank 3 or 4 in, the same with the new height and width out."""
        if len(spec.shape) not in (3, 4):
            raise StageMismatch(f"an image of rank 3 or 4 ({self.layout} or N{self.layout})",
                                describe(spec.dtype, spec.shape),
                                "send images with a channel axis (for one gray image, shape [H, W, 1])")
        if np.dtype(spec.dtype).kind not in "fiu":
            raise StageMismatch("a numeric image", describe(spec.dtype, spec.shape), "cast it to uint8 first")
        shape = list(spec.shape)
        h, w = self._axes()
        shape[h], shape[w] = self.height, self.width
        dtype = spec.dtype if np.dtype(spec.dtype).kind == "f" else np.float32
        return (make_spec(spec.name, dtype, tuple(shape)),)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Interpolate along H, then along W (integer images are converted after the first gather)."""
        h, w = self._axes()
        y = _linear(x, h % x.ndim, self.height)
        y = _linear(y, w % y.ndim, self.width)
        return (y if y.dtype.kind == "f" else y.astype(np.float32),)


def _linear(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Linear interpolation of ``x`` along ``axis`` to ``size`` samples (half-pixel centres).

    ``a + (b - a) * frac`` in float32 (float64 stays float64), computed in place on the gathered rows:
    fancy-index gathers and in-place arithmetic take about half the time of ``np.take`` and temporaries.
    """
    n = x.shape[axis]
    if n == size:
        return x
    src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    src = np.clip(src, 0.0, n - 1)
    lo = np.floor(src).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype(np.float32)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = (src - lo).astype(dtype).reshape(shape)
    index: list[Any] = [slice(None)] * x.ndim
    index[axis] = lo
    a = x[tuple(index)].astype(dtype, copy=False)
    index[axis] = hi
    b = x[tuple(index)].astype(dtype, copy=False)
    b -= a
    b *= frac
    b += a
    return b


@dataclass(frozen=True)
class Transpose(BuiltinStage):
    """Reorder axes by ``perm`` (e.g. NHWC -> NCHW is [0, 3, 1, 2]; ``layout = "NHWC->NCHW"`` says it)."""

    op: ClassVar[str] = "transpose"
    perm: tuple[int, ...] = ()

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Rank must equal len(perm)."""
        if len(spec.shape) != len(self.perm):
            raise StageMismatch(f"a tensor of rank {len(self.perm)} for perm {list(self.perm)}",
                                describe(spec.dtype, spec.shape), "fix perm/layout or the stage before it")
        return (make_spec(spec.name, spec.dtype, tuple(spec.shape[i] for i in self.perm)),)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """A contiguous copy in the new order (the backends want contiguous inputs)."""
        return (np.ascontiguousarray(x.transpose(self.perm)),)


@dataclass(frozen=True)
class Softmax(BuiltinStage):
    """Softmax along ``axis`` (max-subtracted, in the input's float dtype)."""

    op: ClassVar[str] = "softmax"
    axis: int = -1

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Float in, same spec out."""
        need_float(self.name, spec)
        _axis(self.axis, spec, self.name)
        return (spec,)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """exp(x - max) / sum."""
        e = np.exp(x - x.max(axis=self.axis, keepdims=True))
        return (e / e.sum(axis=self.axis, keepdims=True),)

    def output_names(self) -> tuple[str, ...]:
        """One tensor: probabilities."""
        return ("probabilities",)


@dataclass(frozen=True)
class Argmax(BuiltinStage):
    """Index of the largest value along ``axis`` (int64; the axis is removed)."""

    op: ClassVar[str] = "argmax"
    axis: int = -1

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Drops ``axis``."""
        axis = _axis(self.axis, spec, self.name)
        return (make_spec(spec.name, np.int64, spec.shape[:axis] + spec.shape[axis + 1:]),)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """np.argmax."""
        return (np.argmax(x, axis=self.axis).astype(np.int64),)

    def output_names(self) -> tuple[str, ...]:
        """One tensor: the class index."""
        return ("class",)


@dataclass(frozen=True)
class TopK(BuiltinStage):
    """The ``k`` largest values along ``axis``, largest first: (indices int64, scores); ties by index."""

    op: ClassVar[str] = "topk"
    k: int = 5
    axis: int = -1

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """The axis shrinks to k; two tensors out."""
        axis = _axis(self.axis, spec, self.name)
        size = spec.shape[axis]
        if size is not None and size < self.k:
            raise StageMismatch(f"at least k={self.k} values on axis {self.axis}",
                                describe(spec.dtype, spec.shape), "lower k")
        shape = list(spec.shape)
        shape[axis] = self.k
        return make_spec("indices", np.int64, tuple(shape)), make_spec("scores", spec.dtype, tuple(shape))

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """A stable descending sort, cut to k."""
        order = np.argsort(-x, axis=self.axis, kind="stable")
        idx = np.take(order, np.arange(self.k), axis=self.axis)
        return idx.astype(np.int64), np.take_along_axis(x, idx, axis=self.axis)

    def output_names(self) -> tuple[str, ...]:
        """Two tensors: indices and scores."""
        return ("indices", "scores")


@dataclass(frozen=True)
class Threshold(BuiltinStage):
    """``x >= value`` as a bool tensor."""

    op: ClassVar[str] = "threshold"
    value: float = 0.5

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """Same shape, bool."""
        if np.dtype(spec.dtype).kind not in "fiu":
            raise StageMismatch("a numeric tensor", describe(spec.dtype, spec.shape), "threshold scores")
        return (make_spec(spec.name, np.bool_, spec.shape),)

    def run(self, x: np.ndarray) -> tuple[np.ndarray, ...]:
        """Compare."""
        return (x >= self.value,)

    def output_names(self) -> tuple[str, ...]:
        """One tensor: the mask."""
        return ("mask",)


@dataclass(frozen=True)
class ModelStage:
    """A served model (``op = "model"``) or cascade (``op = "cascade"``) run through ``Engine.infer``."""

    name: str
    model: str
    op: str = "model"
    input: str = ""  # "" = the model's only input
    output: str = ""  # "" = the model's only output

    def ports(self, lookup: Lookup) -> tuple[TensorSpec, TensorSpec]:
        """(the input it feeds, the output it reads) of the served model; raises StageMismatch."""
        inputs, outputs = lookup(self.model)
        return (_pick(inputs, self.input, "input", self.model),
                _pick(outputs, self.output, "output", self.model))

    def check(self, spec: TensorSpec, lookup: Lookup) -> tuple[TensorSpec, ...]:
        """The incoming tensor must fit the model's input exactly (dtype, rank, static dims)."""
        want, out = self.ports(lookup)
        fits = np.dtype(spec.dtype) == np.dtype(want.dtype) and len(spec.shape) == len(want.shape) and all(
            w is None or g == w for g, w in zip(spec.shape, want.shape, strict=False))
        if not fits:
            raise StageMismatch(f"{describe(want.dtype, want.shape)} for {self.op} {self.model!r} input "
                                f"{want.name!r}", describe(spec.dtype, spec.shape), _fit_hint(spec, want))
        return (out,)

    def output_names(self) -> tuple[str, ...]:
        """The output name of the model (filled in by the pipeline from the lookup)."""
        return (self.output,) if self.output else ()


def _pick(specs: tuple[TensorSpec, ...], wanted: str, kind: str, model: str) -> TensorSpec:
    names = [s.name for s in specs]
    if wanted:
        for s in specs:
            if s.name == wanted:
                return s
        raise StageMismatch(f"{kind} {wanted!r} of {model!r}", f"{kind}s {names}",
                            f"set {kind} to one of {names}")
    if len(specs) != 1:
        raise StageMismatch(f"one {kind} (or {kind} = NAME)", f"{model!r} with {kind}s {names}",
                            f"set {kind} to one of {names}")
    return specs[0]


def _fit_hint(got: TensorSpec, want: TensorSpec) -> str:
    """Say which stage to add to make ``got`` fit ``want``."""
    if np.dtype(got.dtype) != np.dtype(want.dtype):
        return f'add {{ op = "cast", dtype = "{np.dtype(want.dtype).name}" }} before it'
    if len(got.shape) != len(want.shape):
        return "fix the rank: the model wants rank " + str(len(want.shape))
    if sorted(d or 0 for d in got.shape) == sorted(w or 0 for w in want.shape) or (
            len(got.shape) == 4 and got.shape[3] == want.shape[1]):
        return 'add { op = "transpose", layout = "NHWC->NCHW" } (or the permutation the model needs)'
    return (f"make the static dimensions match {describe(want.dtype, want.shape)}: a resize stage sets "
            "height and width; otherwise fix the pipeline input shape")


Stage = BuiltinStage | ModelStage

def layout_perm(layout: str) -> tuple[int, ...]:
    """``"NHWC->NCHW"`` -> (0, 3, 1, 2); raises ValueError when the two sides are not a permutation."""
    src, sep, dst = layout.replace(" ", "").upper().partition("->")
    if not sep or sorted(src) != sorted(dst) or len(set(src)) != len(src) or not src:
        raise ValueError(f"layout must be like 'NHWC->NCHW' (the same letters reordered), got {layout!r}")
    return tuple(src.index(c) for c in dst)


def check_finite_params(values: tuple[float, ...]) -> bool:
    """True when every value is finite (mean/std/factor from config)."""
    return all(math.isfinite(v) for v in values)
