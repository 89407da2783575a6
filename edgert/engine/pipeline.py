"""The pipeline request path: a chain of numpy stages and served models under one model name.

A pipeline is checked when it is added: every stage's input must fit what the stage before it gives
(dtype, rank, static dimensions), else a :class:`ConfigError` names the pipeline, the stage, what was
expected and what it got, and which stage to add. A swap of a member model is checked the same way
before it serves (:meth:`PipelineSet.check_swap`, called by ``Engine.swap``).

At request time model and cascade stages go through ``Engine.infer`` for their member (admission,
batching, result cache, metrics), as :mod:`edgert.engine.cascade_run` does; built-in stages run on the
caller's thread, or on a worker thread when their input is large (:data:`INLINE_STAGE_BYTES`) so the
event loop keeps serving. Each stage's time is recorded (``Metrics.observe_stage``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from edgert.backends.base import TensorSpec
from edgert.engine.config import InferResult, ModelInfo, ServableModel
from edgert.engine.pipeline_config import PipelineConfig
from edgert.engine.stages import BuiltinStage, ModelStage, Stage, StageMismatch, describe
from edgert.errors import ConfigError, InputError, OverloadedError, UnknownModelError

if TYPE_CHECKING:
    from edgert.engine.engine import Engine

__all__ = ["INLINE_STAGE_BYTES", "NO_MODEL_VERSION", "Pipeline", "PipelineSet"]

#: Built-in stages whose input is at least this large run on a worker thread, not on the event loop
#: (a 224x224x3 frame resize takes ~1 ms; softmax on 1,000 logits ~10 us, less than a thread hop).
INLINE_STAGE_BYTES = 64 * 1024
#: The version of a pipeline with no model stage.
NO_MODEL_VERSION = "builtin"
#: Retry-After given when a pipeline is at its in-flight limit (seconds).
PIPELINE_RETRY_AFTER_S = 0.05

Specs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


class Pipeline:
    """One served pipeline: its config, its request counter and its run logic."""

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.name = config.name
        self.active = 0  # admitted, unfinished requests (guarded by the PipelineSet's lock)
        self.published = ""  # the version last sent to the metrics' model info
        # Consecutive built-in stages run as one group (one thread hop for the group, not per stage).
        self.groups: list[tuple[int, list[BuiltinStage]] | tuple[int, ModelStage]] = []
        for i, stage in enumerate(config.stages):
            if isinstance(stage, ModelStage):
                self.groups.append((i, stage))
            elif self.groups and isinstance(self.groups[-1][1], list):
                self.groups[-1][1].append(stage)
            else:
                self.groups.append((i, [stage]))

    # -- load-time checks --------------------------------------------------------------------------
    def where(self, index: int, stage: Stage) -> str:
        """``pipeline 'p' stage 3 'transpose' (transpose)`` for messages."""
        return f"pipeline {self.name!r} stage {index} {stage.name!r} ({stage.op})"

    def signature(self, lookup: Any) -> tuple[TensorSpec, ...]:
        """Check the whole chain against the served members; return the pipeline's output specs."""
        spec = self.config.input
        outs: tuple[TensorSpec, ...] = (spec,)
        for i, stage in enumerate(self.config.stages):
            try:
                outs = stage.check(spec, lookup)
            except StageMismatch as m:
                raise ConfigError(f"{self.where(i, stage)}: expected {m.expected}, got {m.got}",
                                  hint=m.hint) from None
            spec = outs[0]
        last = self.config.stages[-1]
        names = self.config.outputs or (last.output_names() if not isinstance(last, ModelStage) else ())
        names = names or tuple(o.name for o in outs)
        if len(names) != len(outs):
            raise ConfigError(f"pipeline {self.name!r}: outputs lists {len(names)} names but its last stage "
                              f"{last.name!r} gives {len(outs)} tensor(s)",
                              hint=f"list {len(outs)} name(s) in outputs, or remove outputs")
        return tuple(TensorSpec(n, o.dtype, o.shape) for n, o in zip(names, outs, strict=True))

    # -- request path ----------------------------------------------------------------------------
    def _input(self, inputs: Mapping[str, Any]) -> np.ndarray:
        spec, first = self.config.input, self.config.stages[0]
        if not isinstance(inputs, Mapping) or set(inputs.keys()) != {spec.name}:
            got = sorted(map(str, inputs.keys())) if isinstance(inputs, Mapping) else type(inputs).__name__
            raise InputError(f"pipeline {self.name!r} expects one input {spec.name!r}, got {got}",
                             hint=f"GET /v2/models/{self.name} lists its input")
        x = inputs[spec.name]
        x = x if isinstance(x, np.ndarray) else np.asarray(x)
        fits = x.dtype == spec.dtype and x.ndim == len(spec.shape) and all(
            w is None or g == w for g, w in zip(x.shape, spec.shape, strict=False))
        if not fits:
            raise InputError(
                f"pipeline {self.name!r} input {spec.name!r}: stage 0 {first.name!r} ({first.op}) expects "
                f"{describe(spec.dtype, spec.shape)}, got {describe(x.dtype, x.shape)}",
                hint=f"send {describe(spec.dtype, spec.shape)} (? is any size); "
                     f"GET /v2/models/{self.name} lists its input")
        return x

    def _builtin(self, first: int, stages: list[BuiltinStage], x: np.ndarray
                 ) -> tuple[tuple[np.ndarray, ...], list[float]]:
        """Run consecutive built-in stages; returns their outputs and each stage's seconds."""
        outs: tuple[np.ndarray, ...] = (x,)
        times = []
        for j, stage in enumerate(stages):
            t0 = time.perf_counter()
            try:
                outs = stage.run(outs[0])
            except (ValueError, IndexError, TypeError, FloatingPointError) as exc:
                raise InputError(f"{self.where(first + j, stage)} failed on "
                                 f"{describe(outs[0].dtype, outs[0].shape)}: {exc}") from None
            times.append(time.perf_counter() - t0)
        return outs, times

    def _model_error(self, index: int, stage: ModelStage, exc: InputError) -> InputError:
        return InputError(f"{self.where(index, stage)}: {exc.message}", hint=exc.hint)

    def _feeds(self, engine: Engine, stage: ModelStage) -> tuple[str, str]:
        if stage.input and stage.output:
            return stage.input, stage.output
        info = engine.get(stage.model)
        return (stage.input or info.inputs[0].name, stage.output or info.outputs[0].name)

    def _result(self, engine: Engine, outs: tuple[np.ndarray, ...], versions: list[str],
                outputs: Sequence[str] | None, start: float) -> InferResult:
        names = self.config.outputs or _names(self.config.stages[-1], outs, engine)
        merged = dict(zip(names, outs, strict=True))
        if outputs:
            missing = [o for o in outputs if o not in merged]
            if missing:
                raise InputError(f"pipeline {self.name!r} has no output(s) {missing}; "
                                 f"outputs are {sorted(merged)}")
            merged = {o: merged[o] for o in outputs}
        version = "+".join(versions) or NO_MODEL_VERSION
        if version != self.published:
            self.published = version
            engine.metrics.set_model_info(self.name, version=version, provider="pipeline", kind="pipeline")
        engine.metrics.observe_request(self.name, time.perf_counter() - start)
        return InferResult(merged, self.name, version)

    async def infer_async(self, engine: Engine, inputs: Mapping[str, Any], version: str | None,
                          outputs: Sequence[str] | None, start: float) -> InferResult:
        """Serve one request on the event loop; failures are recorded under the pipeline's name."""
        try:
            _check_version(engine, self.name, version)
            x = self._input(inputs)
            outs: tuple[np.ndarray, ...] = (x,)
            versions: list[str] = []
            for first, group in self.groups:
                if isinstance(group, ModelStage):
                    t0 = time.perf_counter()
                    feed, read = self._feeds(engine, group)
                    try:
                        r = await engine.infer(group.model, {feed: outs[0]})
                    except InputError as exc:
                        raise self._model_error(first, group, exc) from None
                    outs = (r.outputs[read],)
                    versions.append(r.model_version)
                    engine.metrics.observe_stage(self.name, group.name, time.perf_counter() - t0)
                    continue
                if outs[0].nbytes >= INLINE_STAGE_BYTES:
                    outs, times = await asyncio.to_thread(self._builtin, first, group, outs[0])
                else:
                    outs, times = self._builtin(first, group, outs[0])
                for stage, seconds in zip(group, times, strict=True):
                    engine.metrics.observe_stage(self.name, stage.name, seconds)
            return self._result(engine, outs, versions, outputs, start)
        except BaseException as exc:
            engine.record_failure(self.name, start, exc)
            raise

    def infer_sync(self, engine: Engine, inputs: Mapping[str, Any], version: str | None,
                   outputs: Sequence[str] | None, start: float) -> InferResult:
        """Blocking :meth:`infer_async` for threads."""
        try:
            _check_version(engine, self.name, version)
            outs: tuple[np.ndarray, ...] = (self._input(inputs),)
            versions: list[str] = []
            for first, group in self.groups:
                if isinstance(group, ModelStage):
                    t0 = time.perf_counter()
                    feed, read = self._feeds(engine, group)
                    try:
                        r = engine.infer_sync(group.model, {feed: outs[0]})
                    except InputError as exc:
                        raise self._model_error(first, group, exc) from None
                    outs = (r.outputs[read],)
                    versions.append(r.model_version)
                    engine.metrics.observe_stage(self.name, group.name, time.perf_counter() - t0)
                    continue
                outs, times = self._builtin(first, group, outs[0])
                for stage, seconds in zip(group, times, strict=True):
                    engine.metrics.observe_stage(self.name, stage.name, seconds)
            return self._result(engine, outs, versions, outputs, start)
        except BaseException as exc:
            engine.record_failure(self.name, start, exc)
            raise


def _names(last: Stage, outs: tuple[np.ndarray, ...], engine: Engine) -> tuple[str, ...]:
    if isinstance(last, ModelStage):
        return (last.output or engine.get(last.model).outputs[0].name,)
    return last.output_names()


def _check_version(engine: Engine, name: str, version: str | None) -> None:
    if version is not None:
        engine.get(name, version)  # raises UnknownModelError for another version


class PipelineSet:
    """The engine's served pipelines: add (checked), remove, look up, describe, admit, check swaps."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._pipelines: dict[str, Pipeline] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._pipelines

    def names(self) -> list[str]:
        """Served pipeline names."""
        return list(self._pipelines)

    def get(self, name: str) -> Pipeline | None:
        """The pipeline served under ``name``, if any."""
        return self._pipelines.get(name)

    def _lookup(self, override: tuple[str, ServableModel] | None = None) -> Any:
        def lookup(name: str) -> Specs:
            if override is not None and override[0] in (name, *self._small_of(name)):
                # the swapped model, or a cascade presenting it as its small model's signature
                return tuple(override[1].inputs), tuple(override[1].outputs)
            try:
                info = self._engine.get(name)
            except UnknownModelError:
                info = None
            if info is None or info.kind == "pipeline":
                raise StageMismatch(f"a served model or cascade named {name!r}", "nothing serving it",
                                    "add the model to [[models]] (or the cascade to [[cascades]]) first")
            return tuple(info.inputs), tuple(info.outputs)

        return lookup

    def add(self, config: PipelineConfig) -> None:
        """Check ``config``'s chain against the served members, then serve it; raises ConfigError."""
        try:
            self._engine.get(config.name)
        except UnknownModelError:
            pass
        else:
            raise ConfigError(f"pipeline {config.name!r}: the name is already served")
        pipeline = Pipeline(config)
        pipeline.signature(self._lookup())
        with self._lock:
            self._pipelines[config.name] = pipeline
        version = self.version(pipeline)
        pipeline.published = version
        self._engine.metrics.set_model_info(config.name, version=version, provider="pipeline",
                                            kind="pipeline")

    def discard(self, name: str) -> bool:
        """Stop serving pipeline ``name``; False when no pipeline has that name."""
        with self._lock:
            return self._pipelines.pop(name, None) is not None

    def clear(self) -> None:
        """Forget every pipeline (engine close)."""
        with self._lock:
            self._pipelines.clear()

    def _small_of(self, name: str) -> tuple[str, ...]:
        members = self._engine.cascade_members(name)
        return (members[0],) if members is not None else ()

    def _uses(self, pipeline: Pipeline, member: str) -> bool:
        """True when ``pipeline`` runs ``member`` directly or as a member of one of its cascades."""
        return any(m == member or member in (self._engine.cascade_members(m) or ())
                   for m in pipeline.config.members)

    def check_unused(self, member: str) -> None:
        """Raise ConfigError when a served pipeline uses ``member`` (it cannot be removed under it)."""
        users = sorted(p.name for p in self._pipelines.values() if member in p.config.members)
        if users:
            raise ConfigError(f"model {member!r} is used by pipeline(s) {users}", hint="remove them first")

    def check_swap(self, member: str, new_model: ServableModel) -> None:
        """Raise ConfigError if serving ``new_model`` as ``member`` would break a pipeline's chain."""
        for p in list(self._pipelines.values()):
            if self._uses(p, member):
                try:
                    p.signature(self._lookup((member, new_model)))
                except ConfigError as exc:
                    raise ConfigError(f"cannot swap model {member!r} to version {new_model.version!r}: "
                                      f"{exc.message}", hint="serve the new signature under a new model "
                                      "name, or change the pipeline to fit it first") from None

    def version(self, pipeline: Pipeline) -> str:
        """The members' served versions joined with '+'."""
        return "+".join(self._engine.get(m).versions[0] for m in pipeline.config.members) or NO_MODEL_VERSION

    def info(self, pipeline: Pipeline, version: str | None, *, ready: bool) -> ModelInfo:
        """Describe ``pipeline``: its own input and outputs, its members' versions and providers."""
        members = [self._engine.get(m) for m in pipeline.config.members]
        current = "+".join(m.version for m in members) or NO_MODEL_VERSION
        if version is not None and version != current:
            raise UnknownModelError(f"pipeline {pipeline.name!r} has no version {version!r}; "
                                    f"serving {current!r}",
                                    hint="omit the version to use the served one")
        return ModelInfo(
            name=pipeline.name,
            versions=(current,),
            inputs=(pipeline.config.input,),
            outputs=pipeline.signature(self._lookup()),
            provider=f"pipeline({','.join(m.provider for m in members)})",
            format="pipeline",
            ready=ready and all(m.ready for m in members),
            kind="pipeline",
        )

    def admit(self, pipeline: Pipeline) -> None:
        """Count one request in, or raise OverloadedError at the pipeline's in-flight limit."""
        with self._lock:
            if pipeline.active < pipeline.config.max_in_flight:
                pipeline.active += 1
                return
        self._engine.metrics.observe_request(pipeline.name, 0.0, error="overloaded")
        raise OverloadedError(f"pipeline {pipeline.name!r} is overloaded "
                              f"({pipeline.active} requests in flight)",
                              retry_after=PIPELINE_RETRY_AFTER_S,
                              hint="retry shortly, or raise max_in_flight for this pipeline")

    def release(self, pipeline: Pipeline) -> None:
        """Count one request out."""
        with self._lock:
            pipeline.active -= 1

    async def infer(self, pipeline: Pipeline, inputs: Mapping[str, Any], version: str | None,
                    outputs: Sequence[str] | None, start: float) -> InferResult:
        """Admit, then run ``pipeline`` on the event loop."""
        self.admit(pipeline)
        try:
            return await pipeline.infer_async(self._engine, inputs, version, outputs, start)
        finally:
            self.release(pipeline)

    def infer_sync(self, pipeline: Pipeline, inputs: Mapping[str, Any], version: str | None,
                   outputs: Sequence[str] | None, start: float) -> InferResult:
        """Admit, then run ``pipeline`` on this thread."""
        self.admit(pipeline)
        try:
            return pipeline.infer_sync(self._engine, inputs, version, outputs, start)
        finally:
            self.release(pipeline)
