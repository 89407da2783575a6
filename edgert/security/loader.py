"""Glue for the daemon: open the device's keystore, audit log and store; import and load models.

Two calls set up a device (or a demo) with models::

    keys = open_keystore(root, create=True)
    import_files(root, ["models/digits_small_int8.onnx"], keys=keys)

and one loads a model from the store without plaintext touching the disk::

    model = load_from_store(runtime, store, "digits_small_int8")
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgert import paths
from edgert.errors import ModelError
from edgert.security.audit import AuditLog
from edgert.security.keys import DeviceKeys, init_keystore, load_keystore
from edgert.security.membuf import wipe
from edgert.security.package import Manifest, VariantManifest, VariantSource, create_package
from edgert.security.store import ModelStore
from edgert.security.trust import TrustedPublishers

#: ``describe(path) -> (format, inputs, outputs)``: how a plaintext model is described for its manifest.
#: (format, variant, inputs, outputs) of a model file: edgert.backends.describe.describe_file.
Describer = Callable[[Path], tuple[str, str, list[dict[str, Any]], list[dict[str, Any]]]]

__all__ = ["Describer", "import_model",
           "load_from_store", "open_audit", "open_keystore", "open_store", "shred"]

SHRED_BLOCK = 1 << 20


def open_keystore(root: Path, *, create: bool = False) -> DeviceKeys:
    """Load the device keys under ``root`` (creating and auditing them if ``create`` and absent)."""
    kdir = paths.keys_dir(Path(root))
    if create and not kdir.exists():
        keys = init_keystore(kdir)
        with open_audit(root, keys) as audit:
            audit.append("keys_created", fingerprint=keys.wrap_fingerprint)
        return keys
    return load_keystore(kdir)


def open_audit(root: Path, keys: DeviceKeys | None) -> AuditLog:
    """The device audit log, signing checkpoints with the device Ed25519 key."""
    return AuditLog(paths.audit_dir(Path(root)), keys.sign if keys else None)


def open_store(root: Path, keys: DeviceKeys, audit: AuditLog | None = None, *,
               extra_publishers: Iterable[str] = ()) -> ModelStore:
    """The device model store under ``root``, trusting the publishers pinned there (plus config ones)."""
    trusted = TrustedPublishers.load(Path(root), extra_publishers)
    return ModelStore(paths.store_dir(Path(root)), keys, audit=audit, trusted=trusted)


def shred(path: Path) -> None:
    """Overwrite a file with random bytes, fsync, then unlink it.

    Best effort only: flash storage (SD cards, eMMC, SSDs) remaps writes, so old blocks may
    survive until the device erases them. Encrypting at the source is the real protection.
    """
    size = path.stat().st_size
    with open(path, "r+b") as f:
        remaining = size
        while remaining > 0:
            n = min(SHRED_BLOCK, remaining)
            f.write(os.urandom(n))
            remaining -= n
        f.flush()
        os.fsync(f.fileno())
    path.unlink()


def import_model(store: ModelStore, source: Path, *, name: str | None = None, version: str = "1",
                 variant: str | None = None, shred_source: bool = False, allow_downgrade: bool = False,
                 activate: bool = True, now: datetime | None = None,
                 describe: Describer) -> Manifest:
    """Encrypt a plaintext model file to this device's own key, sign it with its own key, install it.

    The store accepts the device's own signing key as the signer (origin "local"). ``describe``
    gives the model's format, variant, inputs and outputs (``edgert.backends.describe.describe_file``;
    passed in because security/ loads no models). ``variant`` overrides the detected one.
    """
    source = Path(source)
    if not source.is_file():
        raise ModelError(f"model file {source} does not exist", hint="check the path")
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", source.stem)
    try:
        fmt, detected, inputs, outputs = describe(source)
    except OSError as exc:
        raise ModelError(f"cannot read model file {source}: {exc.strerror}") from exc
    src = VariantSource(source, variant or detected, fmt, inputs, outputs)
    # The encrypted package goes to a temp file inside the store's directory (ciphertext only).
    fd, tmp_name = tempfile.mkstemp(prefix=".import-", suffix=".edgepkg.tmp", dir=store.root)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as out:
            create_package([src], out, name=name, version=version, recipients=[store.keys.wrap_public],
                           signer=store.keys.sign, now=now or datetime.now(timezone.utc))
        manifest = store.install(tmp, activate=activate, allow_downgrade=allow_downgrade)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    store.audit_event("model_import", model=manifest.name, version=manifest.version, source=source.name,
                      shredded=shred_source, origin="local")
    if shred_source:
        shred(source)
    return manifest


def load_from_store(runtime: Any, store: ModelStore, name: str, version: str | None = None, *,
                    variant: str | None = None,
                    on_manifest: Callable[[VariantManifest], None] | None = None, **load_kwargs: Any) -> Any:
    """Decrypt one variant (None: the first) of a stored model into memory and load it with ``runtime.load``.

    No plaintext touches the disk. The returned model's ``variant`` attribute names the variant
    loaded, and ``on_manifest`` (if given) receives its :class:`VariantManifest` (format, inputs,
    outputs) before the backend sees the bytes. The plaintext is one ``bytes`` object handed to
    the backend without further copies. When the backend keeps no reference to it, it is wiped at
    once; otherwise (onnxruntime's Python wrapper keeps it to re-create the session on an
    execution-provider fallback, LiteRT reads the model in place) it is wiped when the model is
    closed and collected, if nobody else holds it by then.
    """
    manifest, plaintext = store.read_model_bytes(name, version, variant=variant)
    # References before the backend sees it; measured, not assumed, as CPython versions differ.
    own_refs = sys.getrefcount(plaintext)
    try:
        if on_manifest is not None:
            on_manifest(manifest)
        model = runtime.load(plaintext, name=manifest.name, version=manifest.version,
                             format=manifest.format, **load_kwargs)
    except BaseException:
        if sys.getrefcount(plaintext) <= own_refs:
            wipe(plaintext)
        raise
    if sys.getrefcount(plaintext) <= own_refs:
        wipe(plaintext)
    else:
        # A probe held exactly like the plaintext tells the finalizer how many references are its own.
        weakref.finalize(model, _wipe_when_unused, plaintext, object())
    try:
        model.variant = manifest.variant
    except AttributeError:  # objects with __slots__ cannot carry it
        pass
    return model


def _wipe_when_unused(plaintext: bytes, probe: object) -> None:
    # Never write into a buffer a live backend still reads (e.g. an interpreter someone kept).
    if sys.getrefcount(plaintext) <= sys.getrefcount(probe):
        wipe(plaintext)
