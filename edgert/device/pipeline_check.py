"""``edgert daemon --check`` for ``[[pipelines]]``: each stage chain checked against its members' signatures.

The members' inputs and outputs are read from the model files themselves (plaintext files, or one
decryption of the store's version, wiped at once) with :func:`edgert.backends.describe.model_specs`; no
backend loads them. The check is the one the daemon runs at load (:meth:`Pipeline.signature`), so a
chain that does not fit fails here with the same message naming the stage.
"""

from __future__ import annotations

from typing import Any

from edgert.backends.base import TensorSpec
from edgert.config import DaemonConfig, ModelEntry
from edgert.device.check import ERROR, OK, SKIPPED, Finding
from edgert.engine.pipeline import Pipeline
from edgert.engine.stages import StageMismatch, describe
from edgert.errors import ConfigError, EdgertError

__all__ = ["check_pipelines"]

Specs = tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]


class _Unreadable(Exception):
    """A member's signature cannot be read here (the model check reports why)."""


def _read_specs(cfg: DaemonConfig, entry: ModelEntry, store: list[Any]) -> Specs:
    from edgert.backends.describe import model_specs, sniff_format

    try:
        if not entry.from_store:
            with open(entry.path, "rb") as f:
                data: Any = f.read()
            inputs, outputs = model_specs(data, sniff_format(data, entry.path))
            return tuple(inputs), tuple(outputs)
        if not store:
            from edgert.paths import state_dir
            from edgert.security.loader import open_keystore, open_store

            root = state_dir(cfg.state_dir or None)
            store.append(open_store(root, open_keystore(root)))
        from edgert.security.membuf import wipe

        manifest, data = store[0].read_model_bytes(entry.name, entry.version or None)
        try:
            inputs, outputs = model_specs(data, manifest.format)
        finally:
            wipe(data)
        return tuple(inputs), tuple(outputs)
    except (OSError, EdgertError) as exc:
        raise _Unreadable(str(exc)[:200]) from None


def check_pipelines(cfg: DaemonConfig) -> list[Finding]:
    """One finding per pipeline: its chain fits (with outputs), does not (naming the stage), or skipped."""
    models = {m.name: m for m in cfg.models}
    smalls = {c.name: c.small for c in cfg.cascades}
    cache: dict[str, Specs] = {}
    store: list[Any] = []

    def lookup(name: str) -> Specs:
        member = smalls.get(name, name)  # a cascade presents its small model's signature
        if member not in cache:
            entry = models.get(member)
            if entry is None:
                raise StageMismatch(f"a configured model {member!r}", "none", "add it to [[models]]")
            cache[member] = _read_specs(cfg, entry, store)
        return cache[member]

    out = []
    for p in cfg.pipelines:
        what = f"pipeline {p.name}"
        try:
            outputs = Pipeline(p).signature(lookup)
        except ConfigError as exc:
            out.append(Finding(what, ERROR, exc.message, exc.hint or ""))
            continue
        except _Unreadable as exc:
            out.append(Finding(what, SKIPPED, f"a member's signature cannot be read: {exc}"))
            continue
        sig = ", ".join(f"{o.name} {describe(o.dtype, o.shape)}" for o in outputs)
        out.append(Finding(what, OK, f"{p.input.name} {describe(p.input.dtype, p.input.shape)} -> {sig} "
                                     f"({len(p.stages)} stages fit)"))
    return out
