"""Locate data shipped with edgert: in an installed wheel (edgert/data/…) or a source checkout."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """Directory of bundled data ``name`` (``device_profiles`` or ``models``)."""
    installed = Path(str(resources.files("edgert"))) / "data" / name
    if installed.is_dir():
        return installed
    return _REPO_ROOT / name


def sample_model(filename: str) -> Path:
    """Path of a bundled sample model such as ``digits_small_int8.onnx``."""
    return data_dir("models") / filename
