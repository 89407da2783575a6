"""Where served models come from: the encrypted store (default) or, when allowed, a plaintext file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgert.config import ModelEntry
from edgert.errors import ConfigError, StoreError

__all__ = ["ModelSource", "open_store"]

log = logging.getLogger("edgert.device.sources")


def open_store(state_root: Path) -> Any:
    """Open the device's encrypted model store under ``state_root`` (keys from its keystore)."""
    from edgert.security import loader

    return loader.open_store(state_root, loader.open_keystore(state_root))


class ModelSource:
    """Load :class:`ModelEntry` items through a Runtime; the store is opened lazily, once."""

    def __init__(self, runtime: Any, store_factory: Callable[[], Any] | None = None) -> None:
        self.runtime = runtime
        self._store_factory = store_factory
        self._store: Any = None

    @property
    def store(self) -> Any:
        """The model store (opened on first use)."""
        if self._store is None:
            if self._store_factory is None:
                raise ConfigError("no model store is configured", hint="set daemon.state_dir")
            self._store = self._store_factory()
        return self._store

    def load(self, entry: ModelEntry, version: str | None = None) -> Any:
        """Load ``entry`` (at ``version`` for store models; the active one when None)."""
        options = entry.runtime_options()
        if not entry.from_store:
            if version not in (None, "", "1"):
                raise StoreError(
                    f"model {entry.name!r} is a plaintext file and has only version 1",
                    hint="serve it from the encrypted store to switch versions",
                )
            return self.runtime.load(Path(entry.path), name=entry.name, version="1", options=options)
        return self._load_from_store(entry, version or entry.version or None, options)

    def _load_from_store(self, entry: ModelEntry, version: str | None, options: Any) -> Any:
        from edgert.security.loader import load_from_store

        return load_from_store(self.runtime, self.store, entry.name, version, options=options)

    def active_version(self, name: str) -> str | None:
        """The store's active version of ``name`` (None for unknown names)."""
        try:
            active: str | None = self.store.entry(name).active
            return active
        except StoreError:
            return None
