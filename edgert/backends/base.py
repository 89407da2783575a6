"""The one small interface every inference backend implements."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["BackendSession", "Selection", "TensorSpec", "sniff_format"]


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of a model input or output; ``None`` marks a dynamic dimension."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def describe(self) -> str:
        """``name: float32[?, 64]`` style text for messages and the CLI."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {np.dtype(self.dtype).name}[{dims}]"

    def to_dict(self) -> dict[str, object]:
        """JSON-able form (``-1`` for dynamic dimensions, as OIP metadata does)."""
        return {
            "name": self.name,
            "dtype": np.dtype(self.dtype).name,
            "shape": [-1 if d is None else d for d in self.shape],
        }


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


def sniff_format(data: bytes | bytearray | memoryview) -> str | None:
    """``"tflite"``, ``"onnx"`` or None, from the first bytes of a model."""
    head = bytes(data[:16])
    if len(head) >= 8 and head[4:8] == b"TFL3":
        return "tflite"
    # An ONNX ModelProto starts with a protobuf field tag; ir_version (field 1, varint) comes
    # first in files written by onnx/torch, other writers may start with another field.
    if head[:1] in (b"\x08", b"\x12", b"\x1a", b"\x22", b"\x2a", b"\x3a", b"\x42"):
        return "onnx"
    return None
