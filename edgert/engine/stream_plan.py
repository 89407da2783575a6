"""Stream options and their binding to a served model's inputs (pure logic; see engine.streams)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgert.engine.windows import WindowSpec, axis_from_layout
from edgert.errors import InputError

__all__ = [
    "DEFAULT_QUEUE",
    "IDLE_TIMEOUT_S",
    "MAX_QUEUE",
    "POLICIES",
    "StreamOptions",
    "StreamPlan",
    "TensorSpec",
]

POLICIES = ("all", "latest", "drop-oldest")
#: Items a stream queues by default (``all`` and ``drop-oldest``).
DEFAULT_QUEUE = 4
#: Largest ``queue`` a client may ask for.
MAX_QUEUE = 256
#: A stream with no push for this long ends (reason "idle"); a client may ask for less, not more.
IDLE_TIMEOUT_S = 60.0

_OPTION_KEYS = frozenset(
    {"policy", "queue", "deadline_ms", "window", "hop", "axis", "layout", "input"}
    | {"outputs", "idle_timeout_s"}
)


class TensorSpec(Protocol):
    """Name, dtype and shape (None = dynamic) of a model input (serve.port.TensorMeta fits)."""

    @property
    def name(self) -> str:
        """The input's name."""

    @property
    def dtype(self) -> np.dtype[Any]:
        """The input's dtype."""

    @property
    def shape(self) -> tuple[int | None, ...]:
        """The input's shape (None = dynamic)."""


def _int(doc: Mapping[str, Any], key: str, low: int, high: int, default: int | None) -> int | None:
    value = doc.get(key, default)
    if value is None:
        return None
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise InputError(f"stream option {key!r} must be an integer from {low} to {high}, got {value!r}")
    return value


@dataclass(frozen=True)
class StreamOptions:
    """What a client asks for when it opens a stream (parsed from the open message)."""

    model: str
    version: str | None = None
    policy: str = "all"
    queue: int = DEFAULT_QUEUE
    deadline_s: float | None = None
    window: int | None = None
    hop: int | None = None
    axis: int | None = None
    layout: str | None = None
    input: str | None = None
    outputs: tuple[str, ...] | None = None
    idle_timeout_s: float = IDLE_TIMEOUT_S

    @classmethod
    def from_doc(cls, model: str, doc: Mapping[str, Any], version: str | None = None) -> StreamOptions:
        """Validate an open message's options; errors name the option and the allowed values."""
        unknown = sorted(set(doc) - _OPTION_KEYS)
        if unknown:
            raise InputError(f"unknown stream option(s) {unknown}; allowed: {sorted(_OPTION_KEYS)}")
        policy = doc.get("policy", "all")
        if policy not in POLICIES:
            raise InputError(f"stream policy must be one of {list(POLICIES)}, got {policy!r}")
        deadline = doc.get("deadline_ms")
        if deadline is not None and not (
            isinstance(deadline, (int, float)) and not isinstance(deadline, bool) and deadline > 0
        ):
            raise InputError(f"deadline_ms must be a positive number of milliseconds, got {deadline!r}")
        window = _int(doc, "window", 1, 1 << 31, None)
        hop = _int(doc, "hop", 1, 1 << 31, None)
        if hop is not None and window is None:
            raise InputError("stream option 'hop' needs 'window' (both in samples)")
        idle = doc.get("idle_timeout_s", IDLE_TIMEOUT_S)
        if not (isinstance(idle, (int, float)) and not isinstance(idle, bool) and 0 < idle <= IDLE_TIMEOUT_S):
            raise InputError(f"idle_timeout_s must be a number in (0, {IDLE_TIMEOUT_S:g}], got {idle!r}")
        outputs = doc.get("outputs")
        if outputs is not None and not (
            isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
        ):
            raise InputError("stream option 'outputs' must be a list of output names")
        for key in ("layout", "input"):
            if doc.get(key) is not None and not isinstance(doc[key], str):
                raise InputError(f"stream option {key!r} must be a string, got {doc[key]!r}")
        return cls(
            model=model,
            version=version,
            policy=policy,
            queue=_int(doc, "queue", 1, MAX_QUEUE, DEFAULT_QUEUE) or DEFAULT_QUEUE,
            deadline_s=None if deadline is None else float(deadline) / 1000.0,
            window=window,
            hop=hop if hop is not None else window,
            axis=_int(doc, "axis", 0, 31, None),
            layout=doc.get("layout"),
            input=doc.get("input"),
            outputs=tuple(outputs) if outputs is not None else None,
            idle_timeout_s=float(idle),
        )


@dataclass(frozen=True)
class StreamPlan:
    """Options bound to the served model's inputs: which input, item shape, window assembly."""

    options: StreamOptions
    input: str
    dtype: np.dtype[Any]
    item_shape: tuple[int | None, ...]  # the model input without its batch axis (or all of it)
    batched: bool  # the model input has a leading batch axis the stream adds
    window: WindowSpec | None

    @classmethod
    def bind(cls, options: StreamOptions, inputs: Sequence[TensorSpec], max_item_bytes: int) -> StreamPlan:
        """Check ``options`` against the model's inputs and the transport's item size cap."""
        if options.input is not None:
            found = [t for t in inputs if t.name == options.input]
            if not found:
                raise InputError(
                    f"model {options.model!r} has no input {options.input!r}; "
                    f"inputs are {[t.name for t in inputs]}"
                )
            spec = found[0]
        elif len(inputs) == 1:
            spec = inputs[0]
        else:
            raise InputError(
                f"model {options.model!r} has {len(inputs)} inputs; a stream feeds one",
                hint="name it with the stream option 'input'",
            )
        shape = tuple(spec.shape)
        batched = len(shape) >= 2 and shape[0] in (None, 1)
        item_shape = shape[1:] if batched else shape
        window = None
        if options.window is not None:
            axis = options.axis
            if options.layout is not None:
                axis = axis_from_layout(options.layout, len(item_shape))
            axis = axis if axis is not None else len(item_shape) - 1
            if axis >= len(item_shape):
                raise InputError(f"window axis {axis} is outside the item shape {list(item_shape)}")
            fixed = item_shape[axis]
            if fixed is not None and fixed != options.window:
                raise InputError(
                    f"window of {options.window} samples does not fit input {spec.name!r}: "
                    f"it takes {fixed} samples along axis {axis}",
                    hint=f"open the stream with window = {fixed}",
                )
            size = options.window * spec.dtype.itemsize
            for i, dim in enumerate(item_shape):
                if i != axis:
                    size *= dim or 1
            if size > max_item_bytes:
                raise InputError(
                    f"a window of {options.window} samples is {size} bytes, over the {max_item_bytes}-byte "
                    "frame cap",
                    hint="use a smaller window, or raise the daemon's frame cap (socket max_frame_bytes)",
                )
            window = WindowSpec(options.window, options.hop or options.window, axis)
            item_shape = tuple(None if i == axis else d for i, d in enumerate(item_shape))
        return cls(options, spec.name, np.dtype(spec.dtype), item_shape, batched, window)
