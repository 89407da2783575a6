"""LiteRT (TFLite) backend: interpreters from bytes, delegates chosen by the device profile.

``ai_edge_litert`` is imported first and ``tflite_runtime`` is the fallback for old images.
Quantized int8/uint8 inputs and outputs are converted with each tensor's scale and zero point, so
callers always pass and receive float32. The interpreter is not thread-safe, so runs are
serialised with a lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from edgert.backends.base import Selection
from edgert.backends.describe import EDGETPU_CUSTOM_OP, fixed_batch_of_one, tflite_tensor_spec
from edgert.errors import BackendError, ModelError
from edgert.profiles import DelegateSpec

__all__ = ["LiteRTSession", "create_interpreter", "import_error", "interpreter_module"]

log = logging.getLogger("edgert.backends.litert")

_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def interpreter_module() -> tuple[Any | None, list[str]]:
    """The first LiteRT interpreter module that imports, and why the others did not."""
    import importlib

    errors: list[str] = []
    for name in _MODULES:
        try:
            return importlib.import_module(name), errors
        except Exception as exc:  # record every failure; never crash on a missing backend
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return None, errors


def import_error() -> str | None:
    """Why no LiteRT module can be imported, or None."""
    module, errors = interpreter_module()
    return None if module is not None else "; ".join(errors)


DelegateLoader = Callable[[str, dict[str, Any]], Any]


def _checked_loader(load_delegate: Callable[..., Any]) -> DelegateLoader:
    """Probe the library with ctypes before LiteRT's ``load_delegate``.

    When the library is missing, ``load_delegate`` leaves a half-built ``Delegate`` whose
    ``__del__`` raises; probing first keeps that noise out of the logs.
    """
    import ctypes

    def load(library: str, options: dict[str, Any]) -> Any:
        ctypes.CDLL(library)  # raises OSError with the loader's message when it is absent
        return load_delegate(library, options)

    return load


InterpreterFactory = Callable[[bytes, list[Any], int], Any]


def create_interpreter(
    model: bytes,
    delegates: Sequence[DelegateSpec],
    *,
    threads: int = 0,
    loader: DelegateLoader | None = None,
    factory: InterpreterFactory | None = None,
) -> LiteRTSession:
    """Create an interpreter, trying the profile's delegates in order, CPU (XNNPACK) last."""
    module = None
    if loader is None or factory is None:
        module, errors = interpreter_module()
        if module is None:
            raise BackendError(
                "cannot load a TFLite model: LiteRT is not installed (" + "; ".join(errors) + ")",
                hint="pip install 'edgert[litert]'",
            )
    if loader is None:
        assert module is not None
        loader = _checked_loader(module.load_delegate)
    if factory is None:
        assert module is not None
        interp_cls = module.Interpreter

        def factory(content: bytes, delegate_objs: list[Any], n: int) -> Any:
            return interp_cls(
                model_content=content, experimental_delegates=delegate_objs or None, num_threads=n or None
            )

    skipped: list[tuple[str, str]] = []
    tried: list[str] = []
    for spec in delegates:
        tried.append(spec.name)
        try:
            delegate = loader(spec.library, dict(spec.options))
        except Exception as exc:  # missing library, wrong platform, device not present
            skipped.append((spec.name, f"cannot load {spec.library}: {str(exc).strip()[:200]}"))
            log.info("skipping delegate %s: cannot load %s", spec.name, spec.library)
            continue
        try:
            interp = factory(model, [delegate], threads)
            interp.allocate_tensors()
        except Exception as exc:
            skipped.append((spec.name, f"failed to apply: {str(exc).strip()[:200]}"))
            log.warning("delegate %s failed, trying the next: %s", spec.name, exc)
            continue
        return LiteRTSession(interp, Selection(f"litert:{spec.name}", tuple(tried), tuple(skipped)))
    tried.append("cpu")
    try:
        interp = factory(model, [], threads)
        interp.allocate_tensors()
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"LiteRT could not load the model: {first}", hint=_load_hint(first)) from None
    if delegates:
        log.warning("no LiteRT delegate loaded; running on the CPU")
    return LiteRTSession(interp, Selection("litert:cpu", tuple(tried), tuple(skipped), bool(delegates)))


def _signature(detail: Mapping[str, Any]) -> list[int]:
    sig = detail.get("shape_signature")
    return [] if sig is None else [int(d) for d in sig]


def _load_hint(error: str) -> str:
    """What to do about a model LiteRT refused, from its first error line."""
    if EDGETPU_CUSTOM_OP in error:
        return (
            "the model is compiled for the Edge TPU and runs only through its delegate: use the "
            "coral-edgetpu profile on a device with libedgetpu, or load the plain int8 variant"
        )
    if "custom op" in error:
        return "the model needs a custom operator this LiteRT build lacks; convert it with builtin ops only"
    return "the file may be truncated or corrupt; check it with 'edgert models inspect FILE'"


class _Tensor:
    """Binding of one signature tensor: index, quantization and the spec callers see."""

    def __init__(self, name: str, detail: Mapping[str, Any], batch_of_one: bool) -> None:
        self.name = name
        self.index = int(detail["index"])
        self.raw_dtype = np.dtype(detail["dtype"])
        qp = detail.get("quantization_parameters") or {}
        self.spec = tflite_tensor_spec(
            name,
            self.raw_dtype,
            [int(d) for d in detail["shape"]],
            _signature(detail),
            [float(x) for x in qp.get("scales", [])],
            [int(x) for x in qp.get("zero_points", [])],
            batch_of_one,
        )
        q = self.spec.quantization
        self.quantized = q is not None
        self.scale = q.scale if q is not None else 1.0
        self.zero = q.zero_point if q is not None else 0

    def quantize(self, x: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return x.astype(self.raw_dtype, copy=False)
        info = np.iinfo(self.raw_dtype)
        q = np.round(x / self.scale) + self.zero
        return np.clip(q, info.min, info.max).astype(self.raw_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if not self.quantized:
            return q
        return ((q.astype(np.float32) - self.zero) * self.scale).astype(np.float32)


class LiteRTSession:
    """A LiteRT interpreter behind the backend interface."""

    format = "tflite"

    def __init__(self, interpreter: Any, selection: Selection) -> None:
        self._interp = interpreter
        self.selection = selection
        self._lock = threading.Lock()
        in_details, out_details = self._details()
        batch_one = fixed_batch_of_one([(list(d["shape"]), _signature(d)) for d in in_details.values()])
        self._in = [_Tensor(n, d, batch_one) for n, d in in_details.items()]
        self._out = [_Tensor(n, d, batch_one) for n, d in out_details.items()]
        self._by_name = {t.name: t for t in self._out}
        self._per_row = batch_one
        self._shapes: dict[int, tuple[int, ...]] = {
            t.index: tuple(int(x) for x in in_details[t.name]["shape"]) for t in self._in
        }
        self.inputs = [t.spec for t in self._in]
        self.outputs = [t.spec for t in self._out]

    def _details(self) -> tuple[dict[str, Any], dict[str, Any]]:
        # Prefer signature names (e.g. "pixels") over internal tensor names
        # ("serving_default_pixels:0") so ONNX and TFLite variants share a signature.
        interp = self._interp
        try:
            sigs = interp.get_signature_list()
        except Exception:
            sigs = {}
        if sigs:
            key = "serving_default" if "serving_default" in sigs else next(iter(sigs))
            runner = interp.get_signature_runner(key)
            ins = runner.get_input_details()
            outs = runner.get_output_details()
            if ins and outs:
                return dict(ins), dict(sorted(outs.items()))
        return (
            {d["name"]: d for d in interp.get_input_details()},
            {d["name"]: d for d in interp.get_output_details()},
        )

    def _invoke(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        interp = self._interp
        for t in self._in:
            arr = t.quantize(np.asarray(feed[t.name]))
            if self._shapes.get(t.index) != arr.shape:
                interp.resize_tensor_input(t.index, list(arr.shape))
                interp.allocate_tensors()
                self._shapes[t.index] = arr.shape
            # not np.ascontiguousarray: it turns a 0-d array (a scalar input) into a 1-d one
            interp.set_tensor(t.index, arr if arr.flags.c_contiguous else np.array(arr, order="C"))
        interp.invoke()
        return {t.name: t.dequantize(interp.get_tensor(t.index).copy()) for t in self._out}

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run the interpreter (row by row for models built with a fixed batch of one)."""
        names = list(outputs) if outputs else [t.name for t in self._out]
        try:
            with self._lock:
                if self._is_empty_batch(inputs):
                    return self._empty_outputs(inputs, names)
                if self._per_row:
                    n = len(next(iter(inputs.values())))
                    rows = [self._invoke({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
                    merged = {k: np.concatenate([r[k] for r in rows]) for k in names} if rows else {}
                    return merged
                result = self._invoke(inputs)
        except Exception as exc:
            raise BackendError(f"LiteRT failed while running: {str(exc).strip()[:300]}") from None
        return {k: result[k] for k in names}

    def _is_empty_batch(self, inputs: Mapping[str, np.ndarray]) -> bool:
        """True when a dynamic batch dimension is 0 (validated inputs agree on the batch)."""
        return any(
            t.spec.rank_known and t.spec.shape[:1] == (None,) and np.shape(inputs[t.name])[:1] == (0,)
            for t in self._in
        )

    def _empty_outputs(self, inputs: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
        """Outputs for a batch of zero rows, without asking XNNPACK to reshape to zero (it refuses).

        Shapes come from the output specs; when a non-batch dimension is dynamic, one row of
        zeros is run to learn it.
        """
        out: dict[str, np.ndarray] = {}
        probe: dict[str, np.ndarray] | None = None
        for t in self._out:
            if t.name not in names:
                continue
            shape = t.spec.shape
            rest = [d for d in shape[1:] if d is not None]
            if t.spec.rank_known and shape[:1] == (None,) and len(rest) == len(shape) - 1:
                out[t.name] = np.empty((0, *rest), dtype=t.spec.dtype)
                continue
            if probe is None:
                row = {
                    i.name: np.zeros((1, *np.shape(inputs[i.name])[1:]), dtype=i.spec.dtype)
                    if i.spec.rank_known and i.spec.shape[:1] == (None,)
                    else inputs[i.name]
                    for i in self._in
                }
                probe = self._invoke(row)
            out[t.name] = np.empty((0, *probe[t.name].shape[1:]), dtype=probe[t.name].dtype)
        return out

    def close(self) -> None:
        """Drop the interpreter."""
        self._interp = None
