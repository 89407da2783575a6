"""The device's encrypted model store: packages kept as received, active/previous, anti-rollback.

Layout under ``<state>/models``::

    state.json   {"models": {name: {active, previous, installed, variants: {v: [ids]}, failed: {v: why}}},
                  "highest": {name: v}}
    packages/<name>/<version>.edgepkg

``state.json`` is the single commit point: every change writes a temp file, fsyncs it,
``os.replace``\\ s it and fsyncs the directory, so a crash leaves the old state or the new one. The file
is read and written by :mod:`edgert.security.storestate`; this module decides what it says.
Package files are written (and verified) before the state that refers to them; files the state
does not mention are garbage from an interrupted operation and are removed when the store opens.
``highest`` is the anti-rollback floor: the highest version ever activated (a pending install that
never served does not raise it). It survives ``remove``, so removing a model cannot be used to
install an older version.
A package installs only if its origin signature verifies and its signer is a trusted publisher
or this device itself (:mod:`edgert.security.trust`). Nothing is ever pruned implicitly:
:meth:`ModelStore.prune` removes old versions when asked.
Plaintext is only ever produced in memory (:meth:`ModelStore.read_model`); reading and decrypting a
package file is :mod:`edgert.security.readpath`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgert.errors import (
    ModelError,
    RollbackError,
    SecurityError,
    SignatureError,
    StoreError,
    UntrustedSignerError,
)
from edgert.security import package as pkg
from edgert.security.atomic import TMP_SUFFIX, FileSystem, ensure_private_dir
from edgert.security.headermemo import HeaderMemo
from edgert.security.keys import DeviceKeys
from edgert.security.membuf import PlaintextBuffer
from edgert.security.readpath import MMAP_MIN_PAYLOAD as MMAP_MIN_PAYLOAD  # re-exported, as before
from edgert.security.readpath import SMALL_PACKAGE_MAX as SMALL_PACKAGE_MAX  # re-exported, as before
from edgert.security.readpath import ArrayBuffer, PackageReader, select_variant
from edgert.security.storestate import (
    StateFile,
    disk_error,
    entry_doc,
    forget_versions,
    normalise_entry,
    raise_floor,
)
from edgert.security.trust import Origin, TrustedPublishers, check_origin

__all__ = ["AuditSink", "ModelEntry", "ModelStore"]

STATE_FILE = "state.json"
PACKAGES_DIR = "packages"
LOCK_FILE = ".lock"
PKG_SUFFIX = ".edgepkg"
COPY_BLOCK = 1 << 20
#: Versions :meth:`ModelStore.prune` keeps by default (active and previous always among them).
DEFAULT_KEEP_VERSIONS = 3
#: Longest failure reason kept by :meth:`ModelStore.mark_failed`.
MAX_FAILURE_REASON = 500


class AuditSink(Protocol):
    """Anything with ``append(event, **fields)`` (normally :class:`edgert.security.audit.AuditLog`)."""

    def append(self, event: str, **fields: Any) -> Any:
        """Record one event."""


@dataclass(frozen=True)
class ModelEntry:
    """One model's state in the store."""

    name: str
    active: str | None
    previous: str | None
    installed: list[str]
    highest: str | None
    failed: dict[str, str] = field(default_factory=dict)
    variants: dict[str, list[str]] = field(default_factory=dict)


class ModelStore:
    """Encrypted packages on disk, decrypted into memory only."""

    def __init__(self, root: Path, keys: DeviceKeys, *, fs: FileSystem | None = None,
                 audit: AuditSink | None = None, edgert_version: str | None = None,
                 trusted: TrustedPublishers | None = None) -> None:
        from edgert import __version__

        self.root = Path(root)
        self.keys = keys
        self.fs = fs or FileSystem()
        self.audit = audit
        self.edgert_version = edgert_version or __version__
        #: Publishers whose packages install; this device's own signing key is always accepted.
        self.trusted = trusted if trusted is not None else TrustedPublishers()
        self._state = StateFile(os.path.join(self.root, STATE_FILE), self.fs)
        self._packages_dir = os.path.join(self.root, PACKAGES_DIR)
        self._valid_names: set[str] = set()  # names check_name accepted (it is a pure function)
        #: Headers this store verified and their unwrapped keys, reused for byte-identical headers only.
        self.headers = HeaderMemo()
        self._reader = PackageReader(keys, self.headers)
        ensure_private_dir(self.root)
        ensure_private_dir(self.root / PACKAGES_DIR)
        self._collect_garbage()

    # ---- state -------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        """The parsed state, as a private copy the caller may change and save."""
        return self._state.load()

    @contextlib.contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        """Serialise changes across processes (daemon and CLI) with an advisory lock."""
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _package_path(self, name: str, version: str) -> Path:
        return Path(self._package_file(name, version))

    def _package_file(self, name: str, version: str) -> str:
        # A str, not a Path, and each name's regex check once: this sits on the cold-load path of
        # every model, where a regex match or a pathlib join costs several µs with cold CPU caches.
        if name not in self._valid_names:
            self._valid_names.add(pkg.check_name(name))
        return f"{self._packages_dir}/{name}/{version}{PKG_SUFFIX}"

    def _collect_garbage(self) -> None:
        """Remove temp files and packages the state does not refer to (left by a crash)."""
        with self._locked(blocking=False) as got:
            if not got:
                return
            state = self._load_state()
            for model_dir in (self.root / PACKAGES_DIR).iterdir():
                if not model_dir.is_dir():
                    continue
                keep = set(state["models"].get(model_dir.name, {}).get("installed", []))
                for f in model_dir.iterdir():
                    version = f.name[: -len(PKG_SUFFIX)] if f.name.endswith(PKG_SUFFIX) else None
                    if f.name.endswith(TMP_SUFFIX) or version not in keep:
                        self.fs.remove(f, step="gc")
                if not keep:
                    self._drop_empty_dir(model_dir)

    def _emit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(event, **fields)

    def audit_event(self, event: str, **fields: Any) -> None:
        """Append an event to the store's audit log, if it has one (for callers such as import)."""
        self._emit(event, **fields)

    # ---- queries -----------------------------------------------------------------------------
    def entries(self) -> list[ModelEntry]:
        """Every model in the store, sorted by name."""
        state = self._load_state()
        names = sorted(set(state["models"]) | set(state["highest"]))
        out = []
        for name in names:
            m = state["models"].get(name, {})
            out.append(ModelEntry(name, m.get("active"), m.get("previous"),
                                  sorted(m.get("installed", []), key=pkg.parse_version),
                                  state["highest"].get(name), dict(m.get("failed") or {}),
                                  {v: list(x) for v, x in (m.get("variants") or {}).items()}))
        return out

    def entry(self, name: str) -> ModelEntry:
        """State of one model (StoreError if unknown)."""
        for e in self.entries():
            if e.name == name and e.installed:
                return e
        raise StoreError(f"model {name!r} is not installed", hint="'edgert models list' shows what is")

    def header(self, name: str, version: str | None = None) -> pkg.PackageHeader:
        """Parsed (not decrypted) header of an installed package; version None means active."""
        return self._reader.header(self._resolve(name, version))

    def variants(self, name: str, version: str | None = None) -> list[str]:
        """Variant ids of an installed version (None: the active one), in package order."""
        m = self._state.peek()["models"].get(name) or {}
        listed = (m.get("variants") or {}).get(version or m.get("active"))
        return list(listed) if listed else self.header(name, version).manifest.variant_names

    def variant_manifest(self, name: str, version: str | None = None,
                         variant: str | None = None) -> pkg.VariantManifest:
        """What one variant of an installed version is (format, inputs, outputs), without decrypting."""
        manifest = self.header(name, version).manifest
        return pkg.VariantManifest(manifest, select_variant(manifest, variant))

    def _resolve(self, name: str, version: str | None) -> str:
        # One state read and a direct lookup: this sits on the cold-load path of every model.
        m = self._state.peek()["models"].get(name) or {}
        installed = m.get("installed") or []
        if not installed:
            raise StoreError(f"model {name!r} is not installed", hint="'edgert models list' shows what is")
        version = version or m.get("active")
        if version is None:
            raise StoreError(f"model {name!r} has no active version",
                             hint=f"'edgert models activate {name} VERSION'")
        if version not in installed:
            raise StoreError(f"model {name!r} has no installed version {version!r}",
                             hint=f"installed: {', '.join(sorted(installed, key=pkg.parse_version))}")
        return self._package_file(name, version)

    def read_model(self, name: str, version: str | None = None, *,
                   variant: str | None = None) -> tuple[pkg.VariantManifest, bytearray]:
        """Decrypt one variant (None: the first) of a version (None: active) into a ``bytearray``."""
        manifest, buf = self._reader.decrypt(self._resolve(name, version), variant, ArrayBuffer)
        buf.view.release()
        return manifest, buf.array

    def read_model_bytes(self, name: str, version: str | None = None, *,
                         variant: str | None = None) -> tuple[pkg.VariantManifest, bytes]:
        """Decrypt just one variant (None: the first) straight into one ``bytes`` object for a backend.

        No zero-fill and no second copy (see :mod:`edgert.security.membuf`); the caller owns the
        only reference and should :func:`~edgert.security.membuf.wipe` it once no backend uses it.
        """
        manifest, buf = self._reader.decrypt(self._resolve(name, version), variant, PlaintextBuffer)
        return manifest, buf.take()

    # ---- changes -----------------------------------------------------------------------------
    def install(self, source: Path, *, activate: bool = True, allow_downgrade: bool = False) -> pkg.Manifest:
        """Check a package's origin, copy it into the store, verify it fully, then commit (and activate) it.

        Never removes other versions (see :meth:`prune`).
        """
        source = Path(source)
        with self._locked():
            state = self._load_state()
            try:
                with open(source, "rb") as f:
                    header = pkg.read_header(f, source.name)
            except OSError as exc:
                raise ModelError(f"cannot read package {source}: {exc.strerror}") from exc
            except SecurityError:
                self._emit("package_verify_failed", source=source.name)
                raise
            m = header.manifest
            origin = self._check_origin(header)
            m.check_compatible(self.edgert_version)
            self._check_rollback(state, m, allow_downgrade)
            installed = state["models"].get(m.name, {}).get("installed", [])
            final = self._package_path(m.name, m.version)
            if m.version in installed:
                if self.header(m.name, m.version).manifest.digest != m.digest:
                    raise StoreError(f"{m.name} {m.version} is already installed with different content",
                                     hint="give the new build a higher version")
                # Same version again: keep the stored copy, but never report a damaged or
                # foreign file as installed.
                self._verify_source(source, header)
            else:
                self._stage(source, final, header)
            self._commit_install(state, m, activate, origin)
        return m

    def _check_origin(self, header: pkg.PackageHeader) -> Origin:
        """Trusted publisher or this device's own key; otherwise audit ``package_refused`` and raise."""
        try:
            return check_origin(header, self.trusted, self.keys.sign_public)
        except SignatureError as exc:
            reason = ("untrusted_signer" if isinstance(exc, UntrustedSignerError)
                      else "unsigned" if header.signature is None else "bad_signature")
            self._emit("package_refused", model=header.manifest.name, version=header.manifest.version,
                       reason=reason, signer=header.signer_fingerprint)
            raise

    def _check_rollback(self, state: dict[str, Any], m: pkg.Manifest, allow_downgrade: bool) -> None:
        highest = state["highest"].get(m.name)
        if highest is None or pkg.compare_versions(m.version, highest) >= 0:
            return
        if not allow_downgrade:
            self._emit("model_install_refused", model=m.name, version=m.version, highest=highest,
                       reason="downgrade")
            raise RollbackError(f"refusing to install {m.name} {m.version}: version {highest} has already "
                                "been active (anti-rollback)",
                                hint="pass --allow-downgrade to install an older version on purpose")
        self._emit("model_downgrade_allowed", model=m.name, version=m.version, highest=highest)

    def _verify_source(self, source: Path, header: pkg.PackageHeader) -> None:
        """Fully verify a package file in place; audit and raise on failure."""
        try:
            self._reader.verify(source, header)
        except SecurityError as exc:
            self._emit("package_verify_failed", model=header.manifest.name,
                       version=header.manifest.version, error=type(exc).__name__)
            raise
        except OSError as exc:
            raise ModelError(f"cannot read package {source}: {exc.strerror}") from exc

    def _stage(self, source: Path, final: Path, header: pkg.PackageHeader) -> None:
        """Copy ``source`` next to ``final``, verify the copy, then rename it into place."""
        ensure_private_dir(final.parent)
        tmp: Path | None = None
        try:
            with open(source, "rb") as f:
                tmp = self.fs.write_temp(final, iter(lambda: f.read(COPY_BLOCK), b""), step="package")
            self._reader.verify(tmp, header)
            self.fs.commit(tmp, final, step="package")
        except BaseException as exc:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    tmp.unlink()
            self._drop_empty_dir(final.parent)  # a refused package leaves no trace (issue 9 D10)
            if isinstance(exc, SecurityError):
                self._emit("package_verify_failed", model=header.manifest.name,
                           version=header.manifest.version, error=type(exc).__name__)
            if isinstance(exc, OSError):
                what = f"installing {header.manifest.name} {header.manifest.version}"
                raise disk_error(exc, what) from exc
            raise

    @staticmethod
    def _drop_empty_dir(directory: Path) -> None:
        with contextlib.suppress(OSError):  # not empty (other versions) or already gone: keep it
            directory.rmdir()

    def _commit_install(self, state: dict[str, Any], m: pkg.Manifest, activate: bool, origin: Origin) -> None:
        entry = entry_doc(state, m.name, create=True)
        if m.version not in entry["installed"]:
            entry["installed"].append(m.version)
        entry["variants"][m.version] = m.variant_names
        if activate:
            raise_floor(state, m.name, m.version)
        changed = activate and entry["active"] != m.version
        if changed:
            entry["previous"], entry["active"] = entry["active"], m.version
        if activate:
            entry["failed"].pop(m.version, None)
        self._state.save(state, f"installing {m.name} {m.version}")
        self._emit("model_install", model=m.name, version=m.version, variants=m.variant_names,
                   manifest_sha256=m.digest, origin=origin.kind, signer=origin.signer)
        if changed:
            self._emit("model_activate", model=m.name, version=m.version, previous=entry["previous"])

    def _unlink_versions(self, name: str, versions: list[str]) -> None:
        for v in versions:
            self.headers.forget(self._package_file(name, v))
            with contextlib.suppress(OSError):  # leftovers are collected when the store next opens
                self.fs.remove(self._package_path(name, v), step="prune")

    def prune(self, name: str, keep: int = DEFAULT_KEEP_VERSIONS) -> list[str]:
        """Remove old versions so that ``keep`` remain; return the removed ones (oldest first).

        The active and previous versions are never removed (they count towards ``keep``), nor is
        any version above the active one: it is pending (installed, not yet served), and pruning it
        would throw away an update before it ran. The rest are kept highest version first. Each
        removed version is audited (``model_prune``).
        """
        if keep < 1:
            raise StoreError(f"cannot keep {keep} versions", hint="keep at least 1")
        with self._locked():
            state = self._load_state()
            entry = entry_doc(state, name)
            kept = {v for v in (entry["active"], entry["previous"]) if v}
            if entry["active"]:
                kept |= {v for v in entry["installed"] if pkg.compare_versions(v, entry["active"]) > 0}
            for v in sorted(entry["installed"], key=pkg.parse_version, reverse=True):
                if len(kept) >= keep:
                    break
                kept.add(v)
            pruned = sorted((v for v in entry["installed"] if v not in kept), key=pkg.parse_version)
            if not pruned:
                return []
            forget_versions(entry, pruned)
            self._state.save(state, f"pruning {name}")
            for v in pruned:
                self._emit("model_prune", model=name, version=v, keep=keep)
            self._unlink_versions(name, pruned)
            return pruned

    def _activation_check(self, state: dict[str, Any], name: str, version: str,
                          allow_downgrade: bool) -> dict[str, Any]:
        """The model's state entry if ``version`` may become active; raise (and audit) if not."""
        entry = state["models"].get(name)
        if not entry or version not in entry["installed"]:
            raise StoreError(f"model {name!r} has no installed version {version!r}",
                             hint="'edgert models list' shows installed versions")
        highest = state["highest"].get(name)
        if (highest and entry["active"] != version and pkg.compare_versions(version, highest) < 0
                and not allow_downgrade):
            self._emit("model_activate_refused", model=name, version=version, highest=highest)
            raise RollbackError(f"refusing to activate {name} {version}: {highest} has been active "
                                "(anti-rollback)",
                                hint="use 'edgert models rollback' or --allow-downgrade")
        return normalise_entry(entry)

    def check_activate(self, name: str, version: str, *, allow_downgrade: bool = False) -> None:
        """Raise exactly what :meth:`activate` would (unknown version, anti-rollback), changing nothing."""
        self._activation_check(self._load_state(), name, version, allow_downgrade)

    def activate(self, name: str, version: str, *, allow_downgrade: bool = False) -> bool:
        """Make an installed version active (the current one becomes previous); True if that changed.

        Activating the version already active is a no-op (False), never an anti-rollback refusal;
        either way a failure mark on that version (:meth:`mark_failed`) is cleared.
        """
        with self._locked():
            state = self._load_state()
            entry = self._activation_check(state, name, version, allow_downgrade)
            if entry["active"] == version:
                if entry["failed"].pop(version, None) is not None:
                    self._state.save(state, f"clearing the failure mark of {name} {version}")
                    self._emit("model_failed_cleared", model=name, version=version)
                return False
            entry["previous"], entry["active"] = entry["active"], version
            entry["failed"].pop(version, None)
            raise_floor(state, name, version)
            self._state.save(state, f"activating {name} {version}")
            self._emit("model_activate", model=name, version=version, previous=entry["previous"])
            return True

    def rollback(self, name: str, *, expect: str | None = None) -> str:
        """Swap active and previous (audited); return the new active version.

        A second rollback swaps back: after A, B, C were activated, rollback gives B (previous C)
        and rollback again gives C (previous B). With ``expect``, refuse unless the previous
        version is ``expect`` (someone else changed the store meanwhile). The anti-rollback floor
        does not apply: this is an explicit operator action.
        """
        with self._locked():
            state = self._load_state()
            entry = state["models"].get(name)
            if not entry or not entry.get("previous"):
                raise StoreError(f"model {name!r} has no previous version to roll back to")
            entry = normalise_entry(entry)
            if expect is not None and entry["previous"] != expect:
                raise StoreError(f"refusing to roll back {name} to {expect}: its previous version is now "
                                 f"{entry['previous']} (the store changed meanwhile)",
                                 hint="check 'edgert models list' and retry")
            entry["active"], entry["previous"] = entry["previous"], entry["active"]
            entry["failed"].pop(entry["active"], None)
            self._state.save(state, f"rolling back {name}")
            self._emit("model_rollback", model=name, version=entry["active"], from_version=entry["previous"])
            return str(entry["active"])

    def mark_failed(self, name: str, version: str, reason: str) -> None:
        """Record that ``version`` failed to serve (shown by ``models list``; cleared on activation)."""
        reason = str(reason)[:MAX_FAILURE_REASON]
        with self._locked():
            state = self._load_state()
            entry = entry_doc(state, name)
            if version not in entry["installed"]:
                raise StoreError(f"model {name!r} has no installed version {version!r}")
            entry["failed"][version] = reason
            self._state.save(state, f"marking {name} {version} failed")
            self._emit("model_failed", model=name, version=version, reason=reason)

    def remove(self, name: str, version: str | None = None, *, force: bool = False) -> list[str]:
        """Remove one version, or every version with ``version=None``; return what was removed."""
        with self._locked():
            state = self._load_state()
            entry = state["models"].get(name)
            if not entry or (version is not None and version not in entry["installed"]):
                raise StoreError(f"model {name!r} version {version or '(any)'} is not installed")
            entry = normalise_entry(entry)
            targets = list(entry["installed"]) if version is None else [version]
            if entry["active"] in targets and not force:
                raise StoreError(f"{name} {entry['active']} is active",
                                 hint="pass --force to remove it anyway")
            forget_versions(entry, targets)
            for role in ("active", "previous"):
                if entry[role] in targets:
                    entry[role] = None
            if not entry["installed"]:
                del state["models"][name]  # "highest" stays: anti-rollback outlives removal
            self._state.save(state, f"removing {name}")
            self._emit("model_remove", model=name, versions=targets)
            self._unlink_versions(name, targets)
            if not entry["installed"]:
                self._drop_empty_dir(self.root / PACKAGES_DIR / name)
            return targets

