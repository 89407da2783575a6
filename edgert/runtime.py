"""The runtime API: load a model under a device profile and run validated inferences.

>>> rt = Runtime("cpu-generic")
>>> model = rt.load("models/digits_small_int8.onnx")
>>> model.infer({"pixels": x})["logits"]

Models load from bytes (a path is read into memory first), so the same code serves plaintext
files and models decrypted in memory from the encrypted store.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgert.backends.base import BackendSession, Selection, TensorSpec
from edgert.backends.describe import sniff_format
from edgert.errors import ConfigError, InputError, ModelError
from edgert.profiles import Profile, available_profiles, load_profile

__all__ = ["Model", "ModelOptions", "Runtime"]

log = logging.getLogger("edgert.runtime")

NAN_POLICIES = ("allow", "reject")
#: Refuse to read model files larger than this into memory (a 2 GB protobuf is ONNX's own limit).
MAX_MODEL_BYTES = 2 << 30


@dataclass(frozen=True)
class ModelOptions:
    """Per-model options: batch limit, NaN/Inf policy and thread count override."""

    max_batch: int | None = None
    nan_policy: str = "allow"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"nan_policy: got {self.nan_policy!r}; allowed: {', '.join(NAN_POLICIES)}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"max_batch: must be >= 1, got {self.max_batch}")
        if self.threads is not None and self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")


class _InputCheck:
    """Precomputed checks for one input so validation stays a few microseconds."""

    __slots__ = ("dtype", "is_float", "name", "rank", "spec", "static")

    def __init__(self, spec: TensorSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.dtype = np.dtype(spec.dtype)
        self.rank = spec.rank  # None: declared without a shape, any rank is accepted
        self.static = tuple((i, d) for i, d in enumerate(spec.shape) if d is not None)
        self.is_float = self.dtype.kind == "f"


class Model:
    """A model loaded by a :class:`Runtime`, ready for :meth:`infer`."""

    def __init__(
        self,
        session: BackendSession,
        *,
        name: str,
        version: str,
        options: ModelOptions,
        profile: Profile,
        load_seconds: float,
        size_bytes: int,
    ) -> None:
        self._session = session
        self.name = name
        self.version = version
        self.options = options
        self.profile = profile
        self.load_seconds = load_seconds
        self.size_bytes = size_bytes
        self.format: str = session.format
        self.inputs: list[TensorSpec] = list(session.inputs)
        self.outputs: list[TensorSpec] = list(session.outputs)
        self.selection: Selection = session.selection
        self.max_batch: int | None = options.max_batch
        self._checks = [_InputCheck(s) for s in self.inputs]
        self._input_names = {c.name for c in self._checks}
        self._output_names = [o.name for o in self.outputs]
        self._reject_nan = options.nan_policy == "reject"

    @property
    def provider(self) -> str:
        """The execution provider or delegate that really runs this model."""
        return self.selection.effective

    def describe(self) -> dict[str, Any]:
        """A JSON-able description (name, version, format, provider, inputs, outputs)."""
        return {
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "provider": self.provider,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "max_batch": self.max_batch,
        }

    def validate(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Check names, dtypes (safe casts only), ranks, static dims, batch and NaN policy."""
        if not isinstance(inputs, Mapping):
            raise InputError(
                f"inputs must be a mapping of input name to array, got {type(inputs).__name__}",
                hint=f"pass {{{', '.join(repr(c.name) for c in self._checks)}: array}}",
            )
        if inputs.keys() != self._input_names:
            self._name_error(inputs)
        out: dict[str, np.ndarray] = {}
        batch: int | None = None
        for check in self._checks:
            arr = self._coerce(check, inputs[check.name])
            shape = arr.shape
            if check.rank is not None and len(shape) != check.rank:
                raise InputError(
                    f"input {check.name!r}: expected rank {check.rank} "
                    f"({check.spec.describe()}), got shape {list(shape)}",
                )
            for i, d in check.static:
                if shape[i] != d:
                    raise InputError(
                        f"input {check.name!r}: dimension {i} must be {d} "
                        f"({check.spec.describe()}), got shape {list(shape)}",
                    )
            if check.rank and check.spec.shape[0] is None:
                if batch is None:
                    batch = shape[0]
                elif shape[0] != batch:
                    raise InputError(
                        f"input {check.name!r}: batch size {shape[0]} differs from other inputs ({batch})"
                    )
            if self._reject_nan and check.is_float and not np.isfinite(arr).all():
                raise InputError(
                    f"input {check.name!r} contains NaN or Inf, which model {self.name!r} rejects",
                    hint='clean the input, or set nan_policy = "allow" for this model',
                )
            out[check.name] = arr
        if self.max_batch is not None and batch is not None and batch > self.max_batch:
            raise InputError(
                f"batch size {batch} exceeds the maximum of {self.max_batch} for model {self.name!r}",
                hint="split the request into smaller batches",
            )
        return out

    def _name_error(self, inputs: Mapping[str, Any]) -> None:
        expected = sorted(self._input_names)
        got = sorted(map(str, inputs.keys()))
        missing = sorted(self._input_names - set(inputs.keys()))
        unknown = sorted(set(map(str, inputs.keys())) - self._input_names)
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if unknown:
            parts.append(f"unknown {unknown}")
        raise InputError(
            f"model {self.name!r} expects inputs {expected}, got {got} ({'; '.join(parts)})",
            hint="input names are listed by 'edgert models inspect FILE'",
        )

    @staticmethod
    def _coerce(check: _InputCheck, value: Any) -> np.ndarray:
        if isinstance(value, np.ndarray):
            if value.dtype == check.dtype:
                return value
            if np.can_cast(value.dtype, check.dtype, casting="safe"):
                return value.astype(check.dtype)
            raise InputError(
                f"input {check.name!r}: expected dtype {check.dtype.name}, got {value.dtype.name} "
                "(only lossless casts are done automatically)",
                hint=f"convert it first, e.g. x.astype(numpy.{check.dtype.name})",
            )
        try:
            arr = np.asarray(value)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {check.name!r}: cannot make an array from the value: {exc}") from None
        if arr.dtype.kind in "OUS":
            raise InputError(
                f"input {check.name!r}: expected numbers of dtype {check.dtype.name}, got {arr.dtype}"
            )
        # Python lists of floats arrive as float64; JSON-style input is converted to the model's
        # dtype when every value survives the conversion unchanged.
        if arr.dtype != check.dtype and not np.can_cast(arr.dtype, check.dtype, casting="safe"):
            converted = arr.astype(check.dtype)
            with np.errstate(invalid="ignore"):
                same = np.array_equal(converted.astype(arr.dtype), arr, equal_nan=arr.dtype.kind == "f")
            if not same and not (check.is_float and arr.dtype.kind in "fiu"):
                raise InputError(
                    f"input {check.name!r}: values do not fit dtype {check.dtype.name} without loss"
                )
            return converted
        return arr.astype(check.dtype, copy=False)

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run already-validated inputs (used by batchers that validated each request)."""
        return self._session.run(inputs, outputs)

    def infer(self, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Validate ``inputs`` and run the model; returns outputs by name."""
        if outputs:
            unknown = [o for o in outputs if o not in self._output_names]
            if unknown:
                raise InputError(
                    f"model {self.name!r} has no output(s) {unknown}; outputs are {self._output_names}"
                )
        return self._session.run(self.validate(inputs), outputs)

    def close(self) -> None:
        """Release the backend session."""
        self._session.close()

    def __repr__(self) -> str:
        return f"<Model {self.name}:{self.version} {self.format} on {self.provider}>"


class Runtime:
    """Loads models under a device profile. Availability of providers/delegates is injectable."""

    def __init__(
        self,
        profile: str | Profile = "cpu-generic",
        *,
        available_providers: Sequence[str] | None = None,
        delegate_loader: Any = None,
        profile_dirs: list[Path] | None = None,
    ) -> None:
        if isinstance(profile, Profile):
            self.profile = profile
        elif profile == "auto":
            from edgert.detect import detect

            match = detect(available_profiles(profile_dirs).values(), available_providers=available_providers)
            self.profile = match.profile
            log.info("detected profile %s: %s", self.profile.name, "; ".join(match.reasons))
        else:
            self.profile = load_profile(profile, profile_dirs)
        self._available = list(available_providers) if available_providers is not None else None
        self._delegate_loader = delegate_loader

    def load(
        self,
        source: str | os.PathLike[str] | bytes | bytearray | memoryview,
        *,
        name: str | None = None,
        version: str = "1",
        options: ModelOptions | None = None,
        format: str | None = None,
    ) -> Model:
        """Load an ONNX or TFLite model from a path or from bytes."""
        options = options or ModelOptions()
        filename: str | None = None
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = source
            default_name = "model"
        else:
            path = Path(source)
            data = _read_model_file(path)
            default_name = path.stem
            filename = str(path)
        fmt = format or sniff_format(data, filename)
        threads = options.threads if options.threads is not None else self.profile.threads
        start = time.perf_counter()
        session: BackendSession
        if fmt == "onnx":
            from edgert.backends.onnx import create_session

            session = create_session(
                bytes(data) if not isinstance(data, bytes) else data,
                self.profile.providers,
                threads=threads,
                available=self._available,
            )
        elif fmt == "tflite":
            from edgert.backends.litert import create_interpreter

            session = create_interpreter(
                bytes(data), self.profile.delegates, threads=threads, loader=self._delegate_loader
            )
        else:
            raise ModelError(f"unsupported model format {fmt!r}; supported: onnx, tflite")
        elapsed = time.perf_counter() - start
        max_batch = options.max_batch if options.max_batch is not None else self.profile.limits.max_batch
        model = Model(
            session,
            name=name or default_name,
            version=version,
            options=ModelOptions(max_batch=max_batch, nan_policy=options.nan_policy, threads=options.threads),
            profile=self.profile,
            load_seconds=elapsed,
            size_bytes=len(data),
        )
        log.info(
            "loaded model",
            extra={
                "model": model.name,
                "version": version,
                "format": fmt,
                "provider": model.provider,
                "load_ms": round(elapsed * 1000, 2),
            },
        )
        return model


def _read_model_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_MODEL_BYTES:
            raise ModelError(f"model file {path} is {size} bytes, over the {MAX_MODEL_BYTES} byte limit")
        if size == 0:
            raise ModelError(f"model file {path} is empty", hint="the copy may have failed; copy it again")
        return path.read_bytes()
    except FileNotFoundError:
        raise ModelError(f"model file {path} does not exist", hint="check the path") from None
    except IsADirectoryError:
        raise ModelError(f"model path {path} is a directory, not a model file") from None
    except PermissionError:
        raise ModelError(
            f"model file {path} is not readable by this user",
            hint="check its permissions, or run as the user that owns it",
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
