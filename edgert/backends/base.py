"""The one small interface every inference backend implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["BackendSession", "Quantization", "Selection", "TensorSpec"]


@dataclass(frozen=True)
class Quantization:
    """How a quantized tensor is stored in the model: ``real = (q - zero_point) * scale``."""

    dtype: np.dtype
    scale: float
    zero_point: int

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: ``{"dtype": "int8", "scale": 0.0627, "zero_point": -128}``."""
        return {"dtype": np.dtype(self.dtype).name, "scale": self.scale, "zero_point": self.zero_point}


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a model input or output; ``None`` marks a dynamic dimension.

    ``rank_known=False`` marks a tensor declared without any shape (unknown rank), which accepts
    arrays of any rank; its ``shape`` is then ``()`` and must not be read as a scalar. ``dtype``
    is what callers pass and receive; ``quantization`` says how the model really stores it when
    the backend converts (LiteRT int8/uint8 inputs and outputs).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]
    rank_known: bool = True
    quantization: Quantization | None = None

    @property
    def rank(self) -> int | None:
        """Number of dimensions, or None when the model does not declare it."""
        return len(self.shape) if self.rank_known else None

    def describe(self) -> str:
        """``name: float32[?, 64]`` style text for messages and the CLI."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape) if self.rank_known else "any rank"
        text = f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"
        q = self.quantization
        if q is not None:
            stored = np.dtype(q.dtype).name
            text += f" ({stored} in the model, scale {q.scale:.8g}, zero point {q.zero_point})"
        return text

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (``-1`` for dynamic dimensions, as OIP metadata does; null for unknown rank)."""
        doc: dict[str, object] = {
            "name": self.name,
            "dtype": np.dtype(self.dtype).name,
            "shape": [-1 if d is None else d for d in self.shape] if self.rank_known else None,
        }
        if self.quantization is not None:
            doc["quantization"] = self.quantization.to_dict()
        return doc


@dataclass(frozen=True)
class Selection:
    """What provider/delegate selection decided, and why each candidate was skipped."""

    effective: str
    attempted: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    fell_back: bool = False


class BackendSession(Protocol):
    """A model loaded by a backend and ready to run."""

    format: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    selection: Selection

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Run on validated inputs; returns the requested (default: all) outputs by name."""
        ...

    def close(self) -> None:
        """Release the session."""
        ...

