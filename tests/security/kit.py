"""Shared helpers for the security tests (constants and a package builder)."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

from edgert.security.keys import DeviceKeys
from edgert.security.package import create_package

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SMALL_ONNX = MODELS / "digits_small_int8.onnx"
SMALL_TFLITE = MODELS / "digits_small_int8.tflite"
IO_DESC = ([{"name": "pixels", "dtype": "float32", "shape": [None, 64]}],
           [{"name": "logits", "dtype": "float32", "shape": [None, 10]}])


def make_package(model: Path, keys: list[DeviceKeys], *, name: str = "digits", version: str = "1",
                 chunk_size: int = 4096, suite: str | None = None) -> bytes:
    """An .edgepkg (bytes) of ``model`` for ``keys``, with small chunks so tests see many chunks."""
    out = io.BytesIO()
    create_package(model, out, name=name, version=version, variant="int8",
                   recipients=[k.wrap_public for k in keys], now=NOW, io_desc=IO_DESC,
                   chunk_size=chunk_size, suite=suite)
    return out.getvalue()
