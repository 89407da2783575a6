"""edgert: an edge/on-device ML inference runtime.

The public API is pinned in ``__all__`` (a test guards it). Heavy modules (onnxruntime, LiteRT)
are imported lazily, so ``import edgert`` and the CLI stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgert.errors import (
    BackendError,
    ConfigError,
    EdgertError,
    InputError,
    IntegrityError,
    KeyFileError,
    ModelError,
    OverloadedError,
    ProvisionError,
    RollbackError,
    SecurityError,
    ServeError,
    StoreError,
    SyncError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "EdgertError",
    "InputError",
    "IntegrityError",
    "KeyFileError",
    "Model",
    "ModelError",
    "ModelOptions",
    "OverloadedError",
    "Profile",
    "ProvisionError",
    "RollbackError",
    "Runtime",
    "SecurityError",
    "ServeError",
    "StoreError",
    "SyncError",
    "TensorSpec",
    "__version__",
    "load_profile",
]

_LAZY = {
    "Runtime": "edgert.runtime",
    "Model": "edgert.runtime",
    "ModelOptions": "edgert.runtime",
    "TensorSpec": "edgert.backends.base",
    "Profile": "edgert.profiles",
    "load_profile": "edgert.profiles",
}

if TYPE_CHECKING:
    from edgert.backends.base import TensorSpec
    from edgert.profiles import Profile, load_profile
    from edgert.runtime import Model, ModelOptions, Runtime


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'edgert' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
