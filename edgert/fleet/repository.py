"""The fleet's TUF repository: a static directory of signed metadata with consistent snapshots.

``repository/metadata`` holds ``N.root.json``, ``N.targets.json``, ``N.snapshot.json`` and
``timestamp.json``; ``repository/targets`` holds each target as ``<dir>/<sha256>.<basename>``.
Any static HTTP server, CDN or bucket can serve the directory unchanged, and python-tuf's
``ngclient.Updater`` reads it. Every change is a new version of the role, written atomically
(temp file, fsync, rename, fsync the directory), then snapshot and timestamp are re-signed.
Times are passed in (``now``) so that tests and the controller decide the clock.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from edgert.errors import ConfigError
from edgert.fleet.fleetdir import ROLES, FleetDir
from edgert.fleet.keyring import (
    find_role_key,
    load_role_signers,
    new_role_signer,
    retire_role_key,
    save_role_key,
)
from edgert.security.atomic import FileSystem

__all__ = ["PUBLIC_DIR_MODE", "PUBLIC_FILE_MODE", "Rotation", "TufRepository", "consistent_name", "hash_file",
           "rotate"]

#: Repository files are public (a web server serves them): world-readable, owner-writable.
PUBLIC_FILE_MODE = 0o644
PUBLIC_DIR_MODE = 0o755
_VERSIONED_RE = re.compile(r"^(\d+)\.(root|targets|snapshot)\.json$")
_HASH_BLOCK = 1 << 20
#: Lock file (in FLEET/, not served) serialising writers: CLI commands and the controller's refreshes.
LOCK_FILE = "repository.lock"


_P = ParamSpec("_P")
_R = TypeVar("_R")


_Method = Callable[Concatenate["TufRepository", _P], _R]


def _with_lock(method: _Method[_P, _R]) -> _Method[_P, _R]:
    """Run a writing method under the repository lock."""

    @functools.wraps(method)
    def wrapper(self: TufRepository, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.locked():
            return method(self, *args, **kwargs)

    return wrapper


def hash_file(path: Path) -> tuple[int, str]:
    """(length, sha256 hex) of a file, streamed."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def _utc(now: datetime | None) -> datetime:
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).replace(microsecond=0)


def ensure_public_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by a web server."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, PUBLIC_DIR_MODE)
    return path


@dataclass(frozen=True)
class Rotation:
    """What :meth:`TufRepository.rotate` did: the new root version and key ids, and retired key files."""

    role: str
    root_version: int
    old_keyids: tuple[str, ...]
    new_keyids: tuple[str, ...]
    new_key_files: tuple[Path, ...]
    retired: tuple[str, ...]


class TufRepository:
    """Read and write the TUF metadata of one fleet (``root_key_dirs``: where offline root keys are)."""

    def __init__(
        self, fleet: FleetDir, *, root_key_dirs: Sequence[Path] = (), fs: FileSystem | None = None
    ) -> None:
        self.fleet = fleet
        self.key_dirs = [fleet.keys_dir, *[Path(d) for d in root_key_dirs]]
        self.fs = fs or FileSystem()
        self._lock_depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the fleet's repository lock (re-entrant within this object; blocks other writers)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        fd = os.open(self.fleet.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_depth = 1
            try:
                yield
            finally:
                self._lock_depth = 0
        finally:
            os.close(fd)  # closing releases the lock

    @property
    def metadata_dir(self) -> Path:
        """``repository/metadata``."""
        return self.fleet.metadata_dir

    @property
    def targets_dir(self) -> Path:
        """``repository/targets``."""
        return self.fleet.targets_dir

    # -- reading ----------------------------------------------------------------------------------
    def metadata_path(self, role: str, version: int) -> Path:
        """Where version ``version`` of ``role`` lives (the timestamp has one unversioned file)."""
        name = "timestamp.json" if role == "timestamp" else f"{version}.{role}.json"
        return self.metadata_dir / name

    def latest_version(self, role: str) -> int:
        """The highest version of ``role`` on disk (0: none)."""
        if role == "timestamp":
            p = self.metadata_dir / "timestamp.json"
            return Metadata.from_file(str(p)).signed.version if p.is_file() else 0
        versions = [
            int(m.group(1))
            for p in self.metadata_dir.glob(f"*.{role}.json")
            if (m := _VERSIONED_RE.match(p.name))
        ]
        return max(versions, default=0)

    def load(self, role: str, version: int | None = None) -> Metadata[Any]:
        """The newest (or ``version``) metadata of ``role``."""
        version = version or self.latest_version(role)
        path = self.metadata_path(role, version)
        if not version or not path.is_file():
            raise ConfigError(
                f"the fleet repository has no {role} metadata (looked for {path})",
                hint="create the fleet with 'edgert fleet init'",
            )
        return Metadata.from_file(str(path))

    def root(self) -> Root:
        """The newest root."""
        signed = self.load("root").signed
        assert isinstance(signed, Root)
        return signed

    def targets(self) -> Targets:
        """The newest top-level targets."""
        signed = self.load("targets").signed
        assert isinstance(signed, Targets)
        return signed

    def root_bytes(self, version: int | None = None) -> bytes:
        """Root metadata file bytes (newest or ``version``): a device's TUF trust anchor."""
        version = version or self.latest_version("root")
        return self.metadata_path("root", version).read_bytes()

    def target_file(self, target_path: str) -> Path:
        """The consistent-snapshot file of a target (``<dir>/<sha256>.<basename>``)."""
        info = self.targets().targets.get(target_path)
        if info is None:
            raise ConfigError(
                f"{target_path} is not a target of fleet {self.fleet.id}",
                hint="list them with 'edgert fleet model list'",
            )
        return self.targets_dir / consistent_name(target_path, info.hashes["sha256"])

    # -- writing ----------------------------------------------------------------------------------
    def _write(self, role: str, md: Metadata[Any]) -> Path:
        path = self.metadata_path(role, md.signed.version)
        if role != "timestamp" and path.exists():
            raise ConfigError(
                f"{path} already exists: metadata versions are never rewritten",
                hint="another 'edgert fleet' command may be running on this fleet",
            )
        data = md.to_bytes(JSONSerializer(compact=False))
        self.fs.atomic_write(path, [data], mode=PUBLIC_FILE_MODE, step=f"tuf-{role}")
        return path

    @staticmethod
    def _sign(md: Metadata[Any], signers: Iterable[Signer]) -> None:
        md.signatures.clear()
        for s in signers:
            md.sign(s, append=True)

    def signers(self, role: str, root: Root | None = None) -> list[CryptoSigner]:
        """The signers for ``role`` found in the key directories (at least its threshold)."""
        return load_role_signers(root or self.root(), role, self.key_dirs)

    @classmethod
    def create(
        cls,
        fleet: FleetDir,
        *,
        root_signers: Sequence[CryptoSigner],
        root_threshold: int,
        role_signers: dict[str, CryptoSigner],
        now: datetime | None = None,
    ) -> TufRepository:
        """Write version 1 of every role (consistent snapshots on) into an empty repository."""
        if not 1 <= root_threshold <= len(root_signers):
            raise ConfigError(
                f"root threshold {root_threshold} needs 1..{len(root_signers)} root keys",
                hint="pass --root-keys N with N >= --root-threshold",
            )
        now = _utc(now)
        repo = cls(fleet)
        ensure_public_dir(repo.metadata_dir)
        ensure_public_dir(repo.targets_dir)
        root = Root(expires=now + fleet.expires["root"], consistent_snapshot=True)
        for s in root_signers:
            root.add_key(s.public_key, "root")
        root.roles["root"].threshold = root_threshold
        for role in ROLES[1:]:
            root.add_key(role_signers[role].public_key, role)
        md: Metadata[Any] = Metadata(root)
        cls._sign(md, root_signers)
        repo._write("root", md)
        targets: Metadata[Any] = Metadata(Targets(expires=now + fleet.expires["targets"]))
        cls._sign(targets, [role_signers["targets"]])
        repo._write("targets", targets)
        repo._snapshot_and_timestamp(
            now,
            root,
            snapshot_signer=[role_signers["snapshot"]],
            timestamp_signer=[role_signers["timestamp"]],
        )
        return repo

    def _snapshot_and_timestamp(
        self,
        now: datetime,
        root: Root,
        *,
        snapshot_signer: Sequence[Signer] | None = None,
        timestamp_signer: Sequence[Signer] | None = None,
    ) -> None:
        targets_version = self.latest_version("targets")
        snap_version = self.latest_version("snapshot") + 1
        snapshot = Snapshot(
            version=snap_version,
            expires=now + self.fleet.expires["snapshot"],
            meta={"targets.json": MetaFile(version=targets_version)},
        )
        smd: Metadata[Any] = Metadata(snapshot)
        self._sign(smd, snapshot_signer or self.signers("snapshot", root))
        spath = self._write("snapshot", smd)
        self._timestamp(now, root, spath, snap_version, timestamp_signer)

    def _timestamp(
        self,
        now: datetime,
        root: Root,
        snapshot_path: Path,
        snapshot_version: int,
        signer: Sequence[Signer] | None = None,
    ) -> None:
        length, sha = hash_file(snapshot_path)
        ts_version = self.latest_version("timestamp") + 1
        tmd: Metadata[Any] = Metadata(
            Timestamp(
                version=ts_version,
                expires=now + self.fleet.expires["timestamp"],
                snapshot_meta=MetaFile(version=snapshot_version, length=length, hashes={"sha256": sha}),
            )
        )
        self._sign(tmd, signer or self.signers("timestamp", root))
        self._write("timestamp", tmd)

    @_with_lock
    def publish(self, now: datetime | None = None, edit: Callable[[Targets], None] | None = None) -> int:
        """New targets version (after ``edit``), snapshot and timestamp; the targets version."""
        now = _utc(now)
        root = self.root()
        md = self.load("targets")
        targets = md.signed
        assert isinstance(targets, Targets)
        if edit is not None:
            edit(targets)
        targets.version += 1
        targets.expires = now + self.fleet.expires["targets"]
        self._sign(md, self.signers("targets", root))
        self._write("targets", md)
        self._snapshot_and_timestamp(now, root)
        return targets.version

    @_with_lock
    def refresh_timestamp(self, now: datetime | None = None) -> int:
        """A new timestamp over the current snapshot (run it within the timestamp expiry)."""
        now = _utc(now)
        snap_version = self.latest_version("snapshot")
        self._timestamp(now, self.root(), self.metadata_path("snapshot", snap_version), snap_version)
        return self.latest_version("timestamp")

    @_with_lock
    def refresh_snapshot(self, now: datetime | None = None) -> None:
        """A new snapshot and timestamp over the current targets (run it within the snapshot expiry)."""
        self._snapshot_and_timestamp(_utc(now), self.root())

    @_with_lock
    def add_target(
        self, target_path: str, local_file: Path, custom: dict[str, Any], now: datetime | None = None
    ) -> TargetFile:
        """Move ``local_file`` into place as target ``target_path`` and publish it (never replaces a target).

        ``local_file`` should sit in the same file system as the repository (a rename, not a copy).
        """
        if target_path in self.targets().targets:
            raise ConfigError(
                f"{target_path} is already published: a published target never changes",
                hint="publish a new version instead",
            )
        length, sha = hash_file(local_file)
        dest = self.targets_dir / consistent_name(target_path, sha)
        ensure_public_dir(dest.parent)
        os.chmod(local_file, PUBLIC_FILE_MODE)
        with open(local_file, "rb") as f:
            os.fsync(f.fileno())
        self.fs.commit(Path(local_file), dest, step="target")
        info = TargetFile(length, {"sha256": sha}, target_path, unrecognized_fields={"custom": custom})

        def edit(targets: Targets) -> None:
            targets.targets[target_path] = info

        self.publish(now, edit)
        return info

    @_with_lock
    def rotate(self, role: str, now: datetime | None = None, *, keys: int | None = None) -> Rotation:
        """Replace ``role``'s keys through a new root version signed by the old and the new root keys.

        Then targets, snapshot and timestamp are re-signed with the current keys, and the rotated-out
        key files in the fleet's keys directory are deleted (so a leaked copy signs nothing a client accepts).
        ``keys``: how many new keys (default: as many as the role has now; the threshold stays).
        """
        if role not in ROLES:
            raise ConfigError(f"unknown TUF role {role!r}", hint=f"use one of {', '.join(ROLES)}")
        now = _utc(now)
        md = self.load("root")
        root = md.signed
        assert isinstance(root, Root)
        old_root_signers = self.signers("root", root)
        old_keyids = tuple(root.roles[role].keyids)
        count = keys or len(old_keyids)
        if count < root.roles[role].threshold:
            raise ConfigError(f"{count} key(s) cannot meet the {role} threshold {root.roles[role].threshold}")
        new_signers = [new_role_signer() for _ in range(count)]
        new_files = tuple(save_role_key(self.fleet.keys_dir, role, s) for s in new_signers)
        for keyid in old_keyids:
            root.revoke_key(keyid, role)
        for s in new_signers:
            root.add_key(s.public_key, role)
        root.version += 1
        root.expires = now + self.fleet.expires["root"]
        # TUF: version N+1 must carry a threshold of N's root signatures and a threshold of its own.
        signers: dict[str, Signer] = {s.public_key.keyid: s for s in old_root_signers}
        signers.update(
            {s.public_key.keyid: s for s in (new_signers if role == "root" else self.signers("root", root))}
        )
        self._sign(md, signers.values())
        self._write("root", md)
        self.publish(now)
        retired = []
        for keyid in old_keyids:
            if keyid not in root.roles[role].keyids and retire_role_key([self.fleet.keys_dir], role, keyid):
                retired.append(keyid)
        return Rotation(
            role,
            root.version,
            old_keyids,
            tuple(s.public_key.keyid for s in new_signers),
            new_files,
            tuple(retired),
        )

    def offline_root_files(self) -> list[Path]:
        """Root key files currently in the fleet's keys directory (the CLI tells operators to move them)."""
        root = self.root()
        return [
            p
            for kid in root.roles["root"].keyids
            if (p := find_role_key([self.fleet.keys_dir], "root", kid)) is not None
        ]


def consistent_name(target_path: str, sha256: str) -> str:
    """``models/n/3.edgepkg`` + hash -> ``models/n/<sha256>.3.edgepkg`` (what ngclient fetches)."""
    dirname, sep, basename = target_path.rpartition("/")
    if not basename or ".." in target_path.split("/") or target_path.startswith("/"):
        raise ConfigError(f"invalid target path {target_path!r}", hint="use models/<name>/<version>.edgepkg")
    return f"{dirname}{sep}{sha256}.{basename}"


def rotate(fleet: FleetDir, role: str, *, root_key_dirs: Sequence[Path] = (), now: datetime | None = None,
           keys: int | None = None) -> Rotation:
    """Rotate ``role``'s keys of ``fleet`` (see :meth:`TufRepository.rotate`)."""
    return TufRepository(fleet, root_key_dirs=root_key_dirs).rotate(role, now, keys=keys)
