"""Where served models come from: the encrypted store (default) or, when allowed, a plaintext file.

:class:`ModelSource` answers the Deployer's questions about a configured model (which version is
active, which variants a version holds, what its floor is) and performs its two actions: load a
variant into memory, and commit a version as active. Nothing here decides what serves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgert.config import ModelEntry
from edgert.errors import ConfigError, StoreError

__all__ = ["PLAINTEXT_VARIANT", "PLAINTEXT_VERSION", "ModelSource", "open_store"]

log = logging.getLogger("edgert.device.sources")

#: A plaintext model file has exactly one version and one variant.
PLAINTEXT_VERSION = "1"
PLAINTEXT_VARIANT = "file"


class _AuditAppend:
    """Adapts an ``event(name, **fields)`` callable to the store's ``append`` sink."""

    def __init__(self, event: Callable[..., None]) -> None:
        self.event = event

    def append(self, event: str, **fields: Any) -> None:
        """Record one store event."""
        self.event(event, **fields)


def open_store(state_root: Path, audit: Callable[..., None] | None = None,
               trusted_publishers: tuple[str, ...] = ()) -> Any:
    """Open the device's encrypted model store under ``state_root`` (keys from its keystore)."""
    from edgert.security import loader

    sink = _AuditAppend(audit) if audit is not None else None
    return loader.open_store(state_root, loader.open_keystore(state_root), sink,  # type: ignore[arg-type]
                             extra_publishers=trusted_publishers)


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

    # ---- questions -----------------------------------------------------------------------------
    def resolve_version(self, entry: ModelEntry, version: str | None) -> str:
        """The version a request means: the one given, the config's pin, else the store's active one."""
        if not entry.from_store:
            if version not in (None, "", PLAINTEXT_VERSION):
                raise StoreError(f"model {entry.name!r} is a plaintext file and has only version 1",
                                 hint="serve it from the encrypted store to switch versions")
            return PLAINTEXT_VERSION
        if version:
            return version
        active = self.store.entry(entry.name).active  # StoreError when not installed
        if active is None:
            raise StoreError(f"model {entry.name!r} has no active version",
                             hint=f"'edgert models activate {entry.name} VERSION'")
        return str(active)

    def active_version(self, entry: ModelEntry) -> str | None:
        """The store's active version (None when there is none); "1" for a plaintext file."""
        if not entry.from_store:
            return PLAINTEXT_VERSION
        try:
            active = self.store.entry(entry.name).active
        except StoreError:
            return None
        return None if active is None else str(active)

    def previous_version(self, entry: ModelEntry) -> str:
        """The store's previous version; StoreError when there is none."""
        previous = self.store.entry(entry.name).previous if entry.from_store else None
        if previous is None:
            raise StoreError(f"model {entry.name!r} has no previous version to roll back to",
                             hint="'edgert models list' shows installed versions")
        return str(previous)

    def fallback_version(self, entry: ModelEntry, failed: str | None) -> str | None:
        """The version to serve when ``failed`` (the active one) does not: the previous one, if any."""
        try:
            previous = self.store.entry(entry.name).previous
        except StoreError:
            return None
        return None if previous is None or previous == failed else str(previous)

    def check_activate(self, entry: ModelEntry, version: str, *, allow_downgrade: bool) -> None:
        """The store's anti-rollback floor and installed-version check; changes nothing."""
        self.store.check_activate(entry.name, version, allow_downgrade=allow_downgrade)

    def variants(self, entry: ModelEntry, version: str) -> list[str]:
        """The variants a version holds, in package order."""
        if not entry.from_store:
            return [PLAINTEXT_VARIANT]
        return list(self.store.variants(entry.name, version))

    def size_hint(self, entry: ModelEntry, version: str) -> int:
        """The smallest decrypted size among the version's variants (bytes): a lower bound of its footprint,
        known without decrypting (the signed manifest says it)."""
        if not entry.from_store:
            return Path(entry.path).stat().st_size
        manifest = self.store.header(entry.name, version).manifest
        return min(v.plaintext_size for v in manifest.variants)

    def describe(self, entry: ModelEntry, version: str) -> tuple[str, list[Any], list[Any]]:
        """(format, inputs, outputs) of the version's first variant, from its manifest, without loading."""
        m = self.store.variant_manifest(entry.name, version)
        return m.format, list(m.inputs), list(m.outputs)

    def golden(self, entry: ModelEntry, version: str) -> Any:
        """The package's golden (inputs, outputs) for the health check, when it carries them."""
        return None

    def reference(self, entry: ModelEntry, version: str) -> dict[str, Any] | None:
        """The signed reference profile of an installed version (docs/drift.md), or None."""
        if not entry.from_store:
            return None
        reference: dict[str, Any] | None = self.store.header(entry.name, version).manifest.reference
        return reference

    # ---- actions -------------------------------------------------------------------------------
    def load(self, entry: ModelEntry, version: str, variant: str) -> Any:
        """Decrypt (in memory only) and load one variant of ``entry`` at ``version``."""
        options = entry.runtime_options()
        if not entry.from_store:
            return self.runtime.load(Path(entry.path), name=entry.name, version=PLAINTEXT_VERSION,
                                     options=options)
        from edgert.security.loader import load_from_store

        return load_from_store(self.runtime, self.store, entry.name, version, variant=variant,
                               options=options)

    def commit(self, entry: ModelEntry, version: str, *, allow_downgrade: bool) -> list[str]:
        """Make ``version`` the store's active one; prune by the store's policy; return what was pruned."""
        if not entry.from_store:
            return []
        self.store.activate(entry.name, version, allow_downgrade=allow_downgrade)
        return list(self.store.prune(entry.name))

    def mark_failed(self, entry: ModelEntry, version: str, reason: str) -> None:
        """Record in the store that ``version`` failed to serve on this device, and why."""
        if entry.from_store:
            self.store.mark_failed(entry.name, version, reason)
