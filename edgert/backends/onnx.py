"""onnxruntime backend: sessions from bytes, execution providers chosen by the device profile.

Selection is split in two so the accelerator paths can be tested on a CPU-only machine:
:func:`plan_providers` (pure) turns the profile's ordered provider list and the set of providers
this onnxruntime build offers into an ordered list of attempts; :func:`create_session` tries
them in order with an injectable session factory and reports the provider that really runs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgert.backends.base import Selection, TensorSpec
from edgert.backends.describe import onnx_unknown_rank_names
from edgert.errors import BackendError, ModelError
from edgert.profiles import ProviderSpec

__all__ = [
    "Attempt",
    "OnnxSession",
    "available_providers",
    "create_session",
    "import_error",
    "plan_providers",
    "session_config",
]

log = logging.getLogger("edgert.backends.onnx")

CPU = "CPUExecutionProvider"

#: onnxruntime >= 1.29 on Linux and macOS starts a telemetry client on import: a thread, an SQLite
#: event cache and a device id under ~/.cache/Microsoft/DeveloperTools, and uploads to Microsoft.
#: An offline edge runtime sets this to "1" before the first import (unless the environment already
#: sets it, so ``ORT_DISABLE_TELEMETRY=0`` keeps the vendor default). It also saves ~2 MB of RSS.
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def _import_ort() -> Any:
    """Import onnxruntime with its telemetry off unless the environment already decided."""
    os.environ.setdefault(TELEMETRY_ENV, "1")
    import onnxruntime

    return onnxruntime


_ORT_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def import_error() -> str | None:
    """Why onnxruntime cannot be imported, or None if it can."""
    try:
        _import_ort()
    except Exception as exc:  # any import failure is reported, never raised
        return f"{type(exc).__name__}: {exc}"
    return None


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers (empty if it cannot be imported)."""
    try:
        ort = _import_ort()
    except Exception:
        return []
    return list(ort.get_available_providers())


@dataclass(frozen=True)
class Attempt:
    """One session-creation attempt: providers in priority order, CPU always last."""

    providers: tuple[ProviderSpec, ...]

    @property
    def primary(self) -> ProviderSpec:
        """The provider this attempt is trying to get."""
        return self.providers[0]


def plan_providers(
    wanted: Sequence[ProviderSpec], available: Sequence[str]
) -> tuple[list[Attempt], list[tuple[str, str]]]:
    """Ordered attempts for the profile's providers, and (provider, reason) for those skipped.

    Attempt *i* puts candidate *i* first, followed by the remaining candidates (one entry per
    provider name, since onnxruntime accepts each provider once) and finally CPU, so that, for
    example, TensorRT can hand unsupported nodes to CUDA within one session.
    """
    have = set(available)
    candidates: list[ProviderSpec] = []
    skipped: list[tuple[str, str]] = []
    for spec in wanted:
        if spec.name == CPU:
            continue
        if spec.name in have:
            candidates.append(spec)
        else:
            skipped.append((spec.display, "not available in this onnxruntime build"))
    attempts: list[Attempt] = []
    for i in range(len(candidates)):
        chain: list[ProviderSpec] = []
        for spec in candidates[i:]:
            if all(spec.name != c.name for c in chain):
                chain.append(spec)
        cpu = next((s for s in wanted if s.name == CPU), ProviderSpec(CPU))
        attempts.append(Attempt((*chain, cpu)))
    attempts.append(Attempt((next((s for s in wanted if s.name == CPU), ProviderSpec(CPU)),)))
    return attempts, skipped


SessionFactory = Callable[[bytes, Any, list[str], list[dict[str, Any]]], Any]


def _ort_factory(model: bytes, options: Any, providers: list[str], provider_options: list[dict]) -> Any:
    ort = _import_ort()

    ort.set_default_logger_severity(3)  # errors only: we log provider decisions ourselves
    # onnxruntime warns (UserWarning) when a provider is listed but missing; we report the
    # effective provider ourselves, so turn the warning into a log line instead.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = ort.InferenceSession(
            model, sess_options=options, providers=providers, provider_options=provider_options
        )
    for w in caught:
        log.warning("onnxruntime: %s", w.message)
    return session


def session_config(wanted: Sequence[ProviderSpec]) -> dict[str, str]:
    """The session config entries the profile's providers ask for; the first entry of a key wins."""
    merged: dict[str, str] = {}
    for spec in wanted:
        for key, value in spec.session_config.items():
            merged.setdefault(key, value)
    return merged


def _session_options(threads: int, config: Mapping[str, str]) -> Any:
    ort = _import_ort()

    opts = ort.SessionOptions()
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    opts.log_severity_level = 3
    if threads > 0:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


def _clean(msg: str) -> str:
    first = str(msg).strip().splitlines()[0] if str(msg).strip() else type(msg).__name__
    return first[:300]


def create_session(
    model: bytes,
    wanted: Sequence[ProviderSpec],
    *,
    threads: int = 0,
    available: Sequence[str] | None = None,
    factory: SessionFactory | None = None,
) -> OnnxSession:
    """Create a session from model bytes, trying providers in profile order; CPU is last resort."""
    if factory is None and import_error() is not None:
        raise BackendError(
            f"onnxruntime cannot be imported: {import_error()}",
            hint="pip install onnxruntime (or the build for your accelerator)",
        )
    factory = factory or _ort_factory
    avail = list(available) if available is not None else available_providers()
    attempts, skipped = plan_providers(wanted, avail)
    for name, reason in skipped:
        log.info("skipping provider %s: %s", name, reason)
    skipped_all = list(skipped)
    tried: list[str] = []
    last_error = ""
    options = _session_options(threads, session_config(wanted)) if factory is _ort_factory else None
    for attempt in attempts:
        names = [p.name for p in attempt.providers]
        opts = [dict(p.options) for p in attempt.providers]
        tried.append(attempt.primary.display)
        try:
            session = factory(model, options, names, opts)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            last_error = _clean(str(exc))
            if attempt.primary.name != CPU:
                skipped_all.append((attempt.primary.display, f"failed to initialise: {last_error}"))
                log.warning("provider %s failed, trying the next: %s", attempt.primary.display, last_error)
                continue
            raise ModelError(
                f"onnxruntime could not load the model: {last_error}",
                hint="the file may be truncated or corrupt, or use an operator/opset this "
                "onnxruntime does not support; check it with 'edgert models inspect FILE'",
            ) from None
        effective = session.get_providers()[0]
        primary = attempt.primary
        label = primary.display if effective == primary.name else effective
        fell_back = effective != (wanted[0].name if wanted else CPU)
        if effective != primary.name:
            for spec in attempt.providers:
                if spec.name == effective:
                    break
                skipped_all.append((spec.display, f"onnxruntime fell back to {effective}"))
            log.warning("provider %s did not take the model; running on %s", primary.display, effective)
        elif fell_back:
            log.warning("running on %s (preferred providers unavailable)", label)
        selection = Selection(
            effective=label, attempted=tuple(tried), skipped=tuple(skipped_all), fell_back=fell_back
        )
        # onnxruntime shows both a scalar and a shapeless (any-rank) tensor as []; only then is
        # the model itself read to tell them apart (a few ms on a large graph, so not always).
        nodes = [*session.get_inputs(), *session.get_outputs()]
        ambiguous = any(not n.shape for n in nodes)
        return OnnxSession(session, selection, onnx_unknown_rank_names(model) if ambiguous else frozenset())
    raise ModelError(f"onnxruntime could not load the model: {last_error}")  # pragma: no cover


def _spec(node: Any, unknown_rank: frozenset[str] = frozenset()) -> TensorSpec:
    dtype = _ORT_TYPES.get(node.type)
    if dtype is None:
        raise ModelError(
            f"tensor {node.name!r} has unsupported type {node.type}",
            hint="edgert serves numeric tensors (float, int, uint, bool)",
        )
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (node.shape or []))
    if not shape and node.name in unknown_rank:
        # onnxruntime reports [] both for a scalar and for an input declared without a shape;
        # only the model tells them apart, and the latter accepts any rank.
        return TensorSpec(node.name, np.dtype(dtype), (), rank_known=False)
    return TensorSpec(node.name, np.dtype(dtype), shape)


class OnnxSession:
    """A loaded onnxruntime session behind the backend interface."""

    format = "onnx"

    def __init__(
        self, session: Any, selection: Selection, unknown_rank: frozenset[str] = frozenset()
    ) -> None:
        self._session = session
        self.selection = selection
        self.inputs = [_spec(n, unknown_rank) for n in session.get_inputs()]
        self.outputs = [_spec(n, unknown_rank) for n in session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the session; errors from onnxruntime become BackendError."""
        names = list(outputs) if outputs else self._output_names
        try:
            results = self._session.run(names, inputs)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed while running: {_clean(str(exc))}") from None
        return dict(zip(names, results, strict=True))

    def config_entry(self, key: str) -> str | None:
        """The value of an onnxruntime session config entry this session runs with, or None if unset."""
        try:
            value = self._session.get_session_options().get_session_config_entry(key)
        except Exception:  # onnxruntime raises when the key was never set
            return None
        return str(value)

    def close(self) -> None:
        """Drop the session (onnxruntime frees it when the last reference goes)."""
        self._session = None
