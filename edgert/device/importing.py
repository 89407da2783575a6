"""Importing a plaintext model on the device: describe it (backends/), then encrypt and store it (security/).

The two halves live in layers that must not know each other: security/ never loads a model, so the
description (format, variant detected from the model itself, inputs, outputs) is passed in here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgert.backends.describe import describe_file
from edgert.security.loader import import_model
from edgert.security.package import Manifest
from edgert.security.store import ModelStore

__all__ = ["import_plaintext"]


def import_plaintext(store: ModelStore, source: Path, **options: Any) -> Manifest:
    """Encrypt ``source`` to this device, sign it as a local import and install it (see ``import_model``)."""
    return import_model(store, Path(source), describe=describe_file, **options)
