"""``[[pipelines]]``: a pipeline's frozen config and its parser (pure; errors name the file, key and values).

Example (docs/pipelines.md has the reference)::

    [[pipelines]]
    name = "mobilenet-top5"
    input = { name = "frame", dtype = "uint8", shape = [-1, -1, -1, 3] }
    stages = [
      { op = "resize", height = 224, width = 224 },
      { op = "scale", factor = 0.00392156862745098 },
      { op = "normalize", mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] },
      { op = "transpose", layout = "NHWC->NCHW" },
      { op = "model", model = "mobilenetv2" },
      { op = "softmax" },
      { op = "topk", k = 5 },
    ]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from edgert.backends.base import TensorSpec
from edgert.engine.signal_stages import LogMel, Window
from edgert.engine.stages import (
    CAST_DTYPES,
    Argmax,
    BuiltinStage,
    Cast,
    ModelStage,
    Normalize,
    Resize,
    Scale,
    Softmax,
    Stage,
    Threshold,
    TopK,
    Transpose,
    check_finite_params,
    layout_perm,
)
from edgert.errors import ConfigError
from edgert.tomlschema import Table

__all__ = [
    "BUILTIN_OPS", "DEFAULT_MAX_IN_FLIGHT", "OPS", "PipelineConfig", "check_references", "parse_pipeline",
]

#: Built-in ops by name (model and cascade stages are ModelStage).
BUILTIN_OPS: dict[str, type[BuiltinStage]] = {
    c.op: c
    for c in (Cast, Scale, Normalize, Resize, Transpose, Window, LogMel, Softmax, Argmax, TopK, Threshold)
}
#: Every stage ``op`` a pipeline accepts.
OPS = (*BUILTIN_OPS, "model", "cascade")
#: Admitted, unfinished requests per pipeline (its numpy stages hold memory outside the models' limits).
DEFAULT_MAX_IN_FLIGHT = 64
_AXIS_OPS = ("normalize", "softmax", "argmax", "topk")


@dataclass(frozen=True)
class PipelineConfig:
    """A chain of stages served under ``name`` with one input; ``outputs`` renames the last stage's."""

    name: str
    input: TensorSpec
    stages: tuple[Stage, ...]
    outputs: tuple[str, ...] = ()
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT

    def __post_init__(self) -> None:
        where = f"pipeline {self.name!r}"
        if not self.name or "/" in self.name:
            raise ConfigError(f"{where}: name must be non-empty and contain no '/'")
        if not self.stages:
            raise ConfigError(f"{where}: needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}: stage names must be unique, got {names}")
        for s in self.stages[:-1]:
            if isinstance(s, TopK):
                raise ConfigError(f"{where}: stage {s.name!r} (topk) gives two tensors, so it must be last")

    @property
    def members(self) -> tuple[str, ...]:
        """Served models and cascades its stages use, in order."""
        return tuple(s.model for s in self.stages if isinstance(s, ModelStage))


def _numbers(table: Table, key: str, default: tuple[float, ...], *,
             positive: bool = False) -> tuple[float, ...]:
    raw = table.value(key, list, None)
    if raw is None:
        return default
    ok = bool(raw) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
    values = tuple(float(v) for v in raw) if ok else ()
    if not ok or not check_finite_params(values) or (positive and min(values) <= 0):
        kind = "positive numbers" if positive else "numbers"
        table.fail(key, f"must be a non-empty list of finite {kind}, got {raw!r}")
        return default
    return values


def _stage_name(op: str, index: int, model: str, given: str) -> str:
    """The given name, else the model's or the op's (made unique with the index in :func:`_unique`)."""
    return given or f"\0{index}:{model or op}"


def _unique(stages: list[Stage]) -> list[Stage]:
    """Default names: the op (or model) alone when unique in the pipeline, else ``op-INDEX``."""
    bare = [s.name.split(":", 1)[1] if s.name.startswith("\0") else s.name for s in stages]
    out = []
    for i, (s, b) in enumerate(zip(stages, bare, strict=True)):
        if s.name.startswith("\0"):
            s = replace(s, name=b if bare.count(b) == 1 else f"{b}-{i}")
        out.append(s)
    return out


def _parse_stage(table: Table, index: int) -> Stage | None:
    op = table.choice("op", "", OPS) if "op" in table.data else ""
    if not op:
        if "op" not in table.data:
            table.fail("op", f"is required (allowed: {', '.join(OPS)})")
        return None
    given = table.string("name")
    if op in ("model", "cascade"):
        model = table.string("model", required=True, nonempty=True)
        stage: Stage = ModelStage(_stage_name(op, index, model, given), model, op,
                                  table.string("input"), table.string("output"))
        table.check_unknown()
        return stage
    name = _stage_name(op, index, "", given)
    kwargs: dict[str, Any] = {}
    if op == "cast":
        kwargs["dtype"] = table.choice("dtype", "float32", CAST_DTYPES)
    elif op == "scale":
        kwargs["factor"] = table.number("factor", 1.0, minimum=None)
        kwargs["offset"] = table.number("offset", 0.0, minimum=None)
    elif op == "normalize":
        kwargs["mean"] = _numbers(table, "mean", (0.0,))
        kwargs["std"] = _numbers(table, "std", (1.0,), positive=True)
        if len(kwargs["mean"]) > 1 and len(kwargs["std"]) > 1 and len(kwargs["mean"]) != len(kwargs["std"]):
            table.fail("std", f"has {len(kwargs['std'])} values but mean has {len(kwargs['mean'])}")
    elif op == "resize":
        kwargs["height"] = table.integer("height", 224, minimum=1)
        kwargs["width"] = table.integer("width", 224, minimum=1)
        kwargs["layout"] = table.choice("layout", "HWC", ("HWC", "CHW"))
        for key in ("height", "width"):
            if key not in table.data:
                table.fail(key, "is required (the output size in pixels)")
    elif op == "transpose":
        kwargs["perm"] = _perm(table)
    elif op in ("window", "logmel"):
        kwargs["size"] = table.integer("size", 400, minimum=1)
        kwargs["hop"] = table.integer("hop", 160, minimum=1)
        if op == "logmel":
            kwargs["sample_rate"] = table.integer("sample_rate", 16000, minimum=1)
            kwargs["n_mels"] = table.integer("n_mels", 40, minimum=1)
            kwargs["fmin"] = table.number("fmin", 0.0)
            kwargs["fmax"] = table.number("fmax", 0.0)
    elif op == "topk":
        kwargs["k"] = table.integer("k", 5, minimum=1)
    elif op == "threshold":
        kwargs["value"] = table.number("value", 0.5, minimum=None)
    if op in _AXIS_OPS:
        kwargs["axis"] = table.integer("axis", -1, minimum=None)
    table.check_unknown()
    return BUILTIN_OPS[op](name, **kwargs)


def _perm(table: Table) -> tuple[int, ...]:
    has_perm, has_layout = table.has("perm"), table.has("layout")
    if has_perm == has_layout:
        table.fail("perm", 'set exactly one of perm (e.g. [0, 3, 1, 2]) or layout (e.g. "NHWC->NCHW")')
        return (0,)
    if has_layout:
        try:
            return layout_perm(table.string("layout"))
        except ValueError as exc:
            table.fail("layout", str(exc))
            return (0,)
    perm = table.list_of("perm", int, what="an axis index")
    if sorted(perm) != list(range(len(perm))) or not perm:
        table.fail("perm", f"must be a permutation of 0..N-1, got {list(perm)}")
        return (0,)
    return tuple(perm)


def _parse_input(table: Table) -> TensorSpec:
    if not table.valid:
        return TensorSpec("input", np.dtype(np.float32), ())
    name = table.string("name", "input", nonempty=True) or "input"
    dtype = table.choice("dtype", "float32", CAST_DTYPES)
    if "dtype" not in table.data:
        table.fail("dtype", f"is required (allowed: {', '.join(CAST_DTYPES)})")
    dims = table.list_of("shape", int, what="a dimension (-1 for any size)")
    if "shape" not in table.data or not dims or any(d == 0 or d < -1 for d in dims):
        table.fail("shape", f"is required: a non-empty list of sizes, -1 for any size, got {list(dims)}")
    table.check_unknown()
    return TensorSpec(name, np.dtype(dtype), tuple(None if d == -1 else d for d in dims))


def parse_pipeline(table: Table) -> PipelineConfig | None:
    """Parse one ``[[pipelines]]`` table; problems are recorded on ``table`` (None when it is unusable)."""
    name = table.string("name", required=True, nonempty=True)
    if "/" in name:
        table.fail("name", f"must not contain '/', got {name!r}")
    if "input" not in table.data:
        table.fail("input", 'is required, e.g. { name = "frame", dtype = "uint8", '
                            'shape = [-1, 224, 224, 3] }')
    spec = _parse_input(table.table("input"))
    if "stages" not in table.data:
        table.fail("stages", f"is required: a list of stage tables (ops: {', '.join(OPS)})")
    stages = [_parse_stage(t, i) for i, t in enumerate(table.tables("stages"))]
    outputs = table.list_of("outputs", str, what="an output name")
    max_in_flight = table.integer("max_in_flight", DEFAULT_MAX_IN_FLIGHT, minimum=1)
    table.check_unknown()
    if not name or "/" in name or any(s is None for s in stages) or not stages:
        return None
    try:
        return PipelineConfig(name, spec, tuple(_unique([s for s in stages if s is not None])),
                              tuple(outputs), max_in_flight)
    except ConfigError as exc:
        table.fail("stages", exc.message)
        return None


def check_references(table: Table, pipeline: PipelineConfig, models: Iterable[str],
                     cascades: Iterable[str]) -> None:
    """Record on ``table`` each stage naming a model or cascade the config does not serve."""
    models, cascades = set(models), set(cascades)
    for j, s in enumerate(pipeline.stages):
        if not isinstance(s, ModelStage):
            continue
        pool = models if s.op == "model" else cascades
        if s.model not in pool:
            kind = "models" if s.op == "model" else "cascades"
            allowed = ", ".join(sorted(pool)) or f"(no {kind} configured)"
            table.problems.add(f"{table.where('stages')}[{j}].model",
                               f"names {s.model!r}, which is not one of the configured {kind} "
                               f"(allowed: {allowed})")
