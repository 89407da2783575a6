"""The device updater: follow the fleet's signed desired state, fetch the package through TUF, deploy it.

Inputs are the retained desired-state documents of the device's groups
(``edgert/v1/F/groups/G/deployment``) and its own assignment (``edgert/v1/F/devices/D/assignment``).
A document counts only when the pinned fleet command key signed it; the one with the highest ``seq``
wins, and a ``seq`` at or below the last one applied (persisted) is ignored, so a replayed or stale
document changes nothing. The decisions (:func:`parse_desired`, :func:`choose`) are pure.

An update then runs these steps, publishing an ``update`` event for each state (FLEET_CONTRACT):
``downloading`` (TUF refresh through the fetcher, then the target into ``<state>/tuf/downloads``,
ciphertext only, resumable, bounded by the TUF length) -> ``verifying`` (manifest matches the document;
when the package has no wrapped key for this device, its record is fetched from ``keys/<target>`` and
spliced into the header) -> ``installing`` (``store.install(activate=False)``) -> the Deployer (health
check, swap, commit) -> ``healthy`` and ``active`` (``rolled-back`` when the fleet asked for a lower
version), or ``failed`` with the reason while the old version keeps serving.

With ``"shadow": {"percent": P}`` the installed version runs as a shadow candidate instead
(:mod:`edgert.device.shadow`, ``healthy`` with ``"shadow": true``, then ``shadow`` events); the promotion
(same version, no shadow) stops it and deploys what is installed; any other document stops it too.

Crash safety: the job and the last applied ``seq`` live in ``<state>/tuf/updater.json``, written
atomically; every step is idempotent (TUF re-verifies the cached download, the store accepts the same
build again, the Deployer does nothing when that version already serves), so after a SIGKILL the job
resumes, and after :data:`MAX_ATTEMPTS` tries it is abandoned as ``failed``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edgert.device.shadow import ShadowPhase
from edgert.errors import EdgertError, ModelError, SecurityError, SignatureError, SyncError
from edgert.mqtt.repo_protocol import assignment_topic, reply_topic, verify_desired_signature
from edgert.mqtt.topics import deployment_topic
from edgert.security.atomic import FileSystem, ensure_private_dir

__all__ = [
    "MAX_ATTEMPTS", "UPDATE_STATES", "DesiredState", "DesiredStateRejected", "DeviceUpdater", "UpdaterPaths",
    "add_recipient", "choose", "parse_desired",
]

log = logging.getLogger("edgert.device.updater")

UPDATE_STATES = ("downloading", "verifying", "installing", "healthy", "active", "failed", "rolled-back")
#: Tries of one update (crashes included) before it is abandoned as failed.
MAX_ATTEMPTS = 5
#: Pause after a transient failure (no reply, broker down), doubled per attempt, capped (seconds).
RETRY_MIN_S, RETRY_MAX_S = 5.0, 600.0
#: Largest desired-state document and wrapped-key record accepted (bytes).
MAX_DOC_BYTES = 16 * 1024
MAX_KEY_RECORD_BYTES = 16 * 1024
#: Largest package downloaded, whatever TUF says (bytes).
MAX_PACKAGE_BYTES = 2 << 30
STATE_VERSION = 1
#: How often a running shadow evaluation is reported (seconds; only when it has new samples).
SHADOW_REPORT_S = 5.0


class DesiredStateRejected(SecurityError):
    """A desired-state document was refused (unsigned, forged, malformed or for another fleet)."""


class _Transient(Exception):
    """A failure worth retrying later (no reply, broker down, repository not updated yet)."""


@dataclass(frozen=True)
class DesiredState:
    """A verified desired-state document."""

    seq: int
    rollout: str
    model: str
    version: str
    target: str
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class UpdaterPaths:
    """Where the updater keeps its state under the daemon's state dir."""

    state: Path

    @property
    def tuf(self) -> Path:
        """<state>/tuf (0700)."""
        return Path(self.state) / "tuf"

    @property
    def root_file(self) -> Path:
        """The trusted TUF root installed at provisioning."""
        return self.tuf / "root.json"

    @property
    def metadata(self) -> Path:
        """python-tuf's metadata cache."""
        return self.tuf / "metadata"

    @property
    def downloads(self) -> Path:
        """Verified downloads (ciphertext packages)."""
        return self.tuf / "downloads"

    @property
    def partial(self) -> Path:
        """Partial downloads, resumed after a restart."""
        return self.tuf / "downloads" / "partial"

    @property
    def state_file(self) -> Path:
        """The job and the last applied seq."""
        return self.tuf / "updater.json"


def parse_desired(payload: bytes, key: Ed25519PublicKey, fleet: str) -> DesiredState:
    """Verify and parse one desired-state document; DesiredStateRejected says why it was refused."""
    if len(payload) > MAX_DOC_BYTES:
        raise DesiredStateRejected(f"desired-state document is {len(payload)} bytes (limit {MAX_DOC_BYTES})")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise DesiredStateRejected("desired-state document is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise DesiredStateRejected("desired-state document must be a JSON object")
    try:
        verify_desired_signature(doc, key)
    except SignatureError as exc:
        raise DesiredStateRejected(exc.message, hint=exc.hint) from None
    seq, model, version = doc.get("seq"), doc.get("model"), doc.get("version")
    if doc.get("v") != 1 or doc.get("fleet") != fleet:
        raise DesiredStateRejected("desired-state document is for another fleet or version")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise DesiredStateRejected("desired-state field 'seq' must be a non-negative integer")
    if not isinstance(model, str) or not isinstance(version, str):
        raise DesiredStateRejected("desired-state fields 'model' and 'version' must be strings")
    from edgert.security.package import check_name, parse_version

    try:
        check_name(model), parse_version(version)
    except ModelError as exc:
        raise DesiredStateRejected(exc.message) from None
    if doc.get("target") != f"models/{model}/{version}.edgepkg":
        raise DesiredStateRejected(f"desired-state target must be models/{model}/{version}.edgepkg")
    return DesiredState(seq, str(doc.get("rollout", ""))[:64], model, version, doc["target"], doc)


def choose(docs: Iterable[DesiredState], applied_seq: int) -> DesiredState | None:
    """The document to act on: the highest ``seq``, if it is above the last one applied."""
    best = max(docs, key=lambda d: d.seq, default=None)
    return best if best is not None and best.seq > applied_seq else None


def add_recipient(source: Path, out: Path, record: Mapping[str, Any], fs: FileSystem | None = None) -> None:
    """Write ``source`` to ``out`` (atomically) with one more wrapped-key record in its header.

    Recipients sit outside the publisher's signature, so the manifest, payload and signature are
    unchanged; the store still verifies all of them on install.
    """
    from edgert.security.package import MAGIC, canonical_json, read_header

    with open(source, "rb") as f:
        header = read_header(f, source.name)
        doc: dict[str, Any] = {"manifest": header.manifest.raw,
                               "recipients": [*header.recipients, dict(record)]}
        if header.signature is not None:
            doc["signature"] = header.signature
        body = canonical_json(doc)
        f.seek(header.payload_offset)
        head = MAGIC + len(body).to_bytes(4, "big") + body
        (fs or FileSystem()).atomic_write(out, [head, *iter(lambda: f.read(1 << 20), b"")], step="splice")


class DeviceUpdater:
    """Follows the fleet's desired state on one device; see the module docstring.

    ``handle_message`` is called from the MQTT network thread and never blocks; the work runs in
    ``run_pending`` (from :meth:`start`'s worker thread, or any thread but the daemon loop's).
    """

    def __init__(self, *, fleet: str, device: str, groups: Iterable[str], command_key: Ed25519PublicKey,
                 paths: UpdaterPaths, fetcher_factory: Callable[[Path], Any], store: Any, deployer: Any,
                 emit: Callable[[dict[str, Any]], None], repo_replies: Callable[[bytes], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, metadata_url: str = "mqtt:metadata/",
                 targets_url: str = "mqtt:targets/", keys_url: str = "mqtt:keys/",
                 max_attempts: int = MAX_ATTEMPTS,
                 retry_s: tuple[float, float] = (RETRY_MIN_S, RETRY_MAX_S),
                 shadow_report_s: float = SHADOW_REPORT_S) -> None:
        self.fleet, self.device, self.key, self.paths = fleet, device, command_key, paths
        self.fetcher_factory, self.store, self.deployer, self.emit = fetcher_factory, store, deployer, emit
        self.repo_replies, self.clock = repo_replies, clock
        self.metadata_url, self.targets_url, self.keys_url = metadata_url, targets_url, keys_url
        self.max_attempts, self.retry_s = max_attempts, retry_s
        self.desired_topics = [deployment_topic(fleet, g) for g in groups] + [assignment_topic(fleet, device)]
        self.reply_topic = reply_topic(fleet, device)
        self.fs = FileSystem()
        self.counters = {"accepted": 0, "rejected": 0, "ignored": 0, "applied": 0, "failed": 0}
        self._docs: dict[str, DesiredState] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_try = 0.0
        self._state = self._load_state()
        self.shadow = ShadowPhase(deployer=deployer, emit=emit, shadows=self._state.setdefault("shadows", {}),
                                  save=self._save_state, lock=self._lock, clock=clock,
                                  report_s=shadow_report_s)

    @classmethod
    def over_mqtt(cls, publish: Callable[[str, bytes], Any], *, fleet: str, device: str,
                  state_dir: Path, repository_url: str | None = None, **kwargs: Any) -> DeviceUpdater:
        """An updater fetching over the repository topics through ``publish`` (e.g. MqttLink.publish).

        With ``repository_url`` (a static HTTP(S) copy of the fleet's repository: a CDN or a bucket),
        metadata and packages come from there through python-tuf's own fetcher; key records for
        devices enrolled after a package was made still come over MQTT.
        """
        from edgert.device.repo_fetcher import MqttFetcher, RepoRequester, RoutingFetcher

        requester = RepoRequester(publish, fleet=fleet, device=device)
        if repository_url:
            return cls(fleet=fleet, device=device, paths=UpdaterPaths(Path(state_dir)),
                       fetcher_factory=lambda partial: RoutingFetcher(
                           MqttFetcher(requester, partial_dir=partial)),
                       metadata_url=f"{repository_url}metadata/", targets_url=f"{repository_url}targets/",
                       repo_replies=requester.handle_reply, **kwargs)
        return cls(fleet=fleet, device=device, paths=UpdaterPaths(Path(state_dir)),
                   fetcher_factory=lambda partial: MqttFetcher(requester, partial_dir=partial),
                   repo_replies=requester.handle_reply, **kwargs)

    # -- state ----------------------------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.paths.state_file.read_bytes())
            if isinstance(doc, dict) and doc.get("v") == STATE_VERSION \
                    and isinstance(doc.get("applied_seq"), int):
                return doc
            log.error("updater state file is not recognised; starting afresh", extra={
                "path": str(self.paths.state_file)})
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("cannot read updater state; starting afresh", extra={"error": str(exc)[:200]})
        return {"v": STATE_VERSION, "applied_seq": -1, "job": None}

    def _save_state(self) -> None:
        ensure_private_dir(self.paths.tuf)
        self.fs.atomic_write(self.paths.state_file, [json.dumps(self._state, sort_keys=True).encode()],
                             step="updater-state")

    @property
    def applied_seq(self) -> int:
        """The highest seq applied (or abandoned) on this device."""
        return int(self._state["applied_seq"])

    @property
    def job(self) -> dict[str, Any] | None:
        """The update in progress: {"doc", "attempts", "phase"}, or None."""
        return self._state.get("job")

    # -- wiring ---------------------------------------------------------------------------------------
    def subscriptions(self) -> list[str]:
        """Topics to subscribe to with QoS 1 (renew after every reconnect)."""
        return [*self.desired_topics, self.reply_topic]

    def handle_message(self, topic: str, payload: bytes) -> bool:
        """Take one MQTT message; False if the topic is not the updater's. Never blocks."""
        if topic == self.reply_topic:
            if self.repo_replies is not None:
                self.repo_replies(payload)
            return True
        if topic not in self.desired_topics:
            return False
        if not payload:  # a cleared retained document
            with self._lock:
                self._docs.pop(topic, None)
            return True
        try:
            doc = parse_desired(payload, self.key, self.fleet)
        except DesiredStateRejected as exc:
            self.counters["rejected"] += 1
            log.warning("desired-state document refused", extra={"topic": topic, "error": exc.message})
            return True
        with self._lock:
            self._docs[topic] = doc
            job = self.job
            floor = max(self.applied_seq, job["doc"]["seq"] if job else -1)
            chosen = choose(self._docs.values(), floor)
            if chosen is None:
                self.counters["ignored"] += 1
                return True
            if job is not None:
                log.warning("a newer desired state replaces the update in progress", extra={
                    "old_seq": job["doc"]["seq"], "seq": chosen.seq})
            self.counters["accepted"] += 1
            self._state["job"] = {"doc": dict(chosen.raw), "attempts": 0, "phase": "pending"}
            self._save_state()
            self._next_try = 0.0
        self._wake.set()
        return True

    # -- worker ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Run pending updates on a worker thread (woken by new documents and retry timers)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="edgert-updater", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker (an update in progress resumes at the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        for doc, reason in self.shadow.resume():
            self._event(parse_desired_raw(doc), "failed", reason=f"shadow evaluation not resumed: {reason}")
        while not self._stop.is_set():
            try:
                self.run_pending()
                self.shadow.report()
            except Exception:  # the worker must survive anything one update does
                log.exception("update step failed unexpectedly")
            wait = max(0.05, self._next_try - self.clock()) if self.job else None
            self._wake.wait(self.shadow.wait_s(wait))
            self._wake.clear()

    def run_pending(self) -> str | None:
        """Advance the pending update, if any and due; return its final state when it ended."""
        with self._lock:
            job = self.job
            if job is None or self.clock() < self._next_try:
                return None
            job["attempts"] += 1
            self._save_state()
        doc = parse_desired_raw(job["doc"])
        if job["attempts"] > self.max_attempts:
            return self._finish(doc, "failed", f"gave up after {self.max_attempts} attempts: "
                                               f"{job.get('error') or 'interrupted'}")
        try:
            return self._apply(doc, job)
        except _Transient as exc:
            delay = min(self.retry_s[1], self.retry_s[0] * 2 ** (job["attempts"] - 1))
            with self._lock:
                job["error"] = str(exc)[:300]
                if self.job is job:
                    self._save_state()
                self._next_try = self.clock() + delay
            log.warning("update interrupted; will retry", extra={"seq": doc.seq, "error": str(exc)[:200],
                                                                 "retry_in_s": delay})
            return None
        except Exception as exc:
            reason = exc.message if isinstance(exc, EdgertError) else f"{type(exc).__name__}: {exc}"
            return self._finish(doc, "failed", reason[:300])

    # -- one update -----------------------------------------------------------------------------------
    def _event(self, doc: DesiredState, state: str, **extra: Any) -> None:
        event = {"event": "update", "rollout": doc.rollout, "model": doc.model, "version": doc.version,
                 "seq": doc.seq, "state": state, **extra}
        try:
            self.emit(event)
        except Exception:  # an event sink must never fail an update
            log.exception("update event sink failed")

    def _phase(self, job: dict[str, Any], phase: str) -> None:
        with self._lock:
            job["phase"] = phase
            if self.job is job:
                self._save_state()

    def _finish(self, doc: DesiredState, state: str, reason: str | None = None, **extra: Any) -> str:
        with self._lock:
            if self.job is not None and self.job["doc"].get("seq") == doc.seq:
                self._state["job"] = None
            self._state["applied_seq"] = max(self.applied_seq, doc.seq)
            self._save_state()
        self.counters["applied" if state != "failed" else "failed"] += 1
        self._event(doc, state, **({"reason": reason} if reason else {}), **extra)
        if state == "failed":
            log.error("update failed; the serving version is unchanged", extra={
                "model": doc.model, "version": doc.version, "error": reason})
        self._clean(doc)
        return state

    def _clean(self, doc: DesiredState) -> None:
        for path in (self._download_path(doc), self._download_path(doc).with_suffix(".spliced")):
            with contextlib.suppress(OSError):
                path.unlink()

    def _download_path(self, doc: DesiredState) -> Path:
        return self.paths.downloads / quote(doc.target, safe="")

    def _tuf(self) -> tuple[Any, Any]:
        from tuf.ngclient import Updater

        for d in (self.paths.metadata, self.paths.partial):
            ensure_private_dir(d)
        try:
            root = self.paths.root_file.read_bytes()
        except OSError as exc:
            raise SecurityError(f"the trusted TUF root {self.paths.root_file} cannot be read: {exc.strerror}",
                                hint="install the fleet's root.json there at provisioning") from None
        fetcher = self.fetcher_factory(self.paths.partial)
        return Updater(str(self.paths.metadata), self.metadata_url, str(self.paths.downloads),
                       self.targets_url, fetcher=fetcher, bootstrap=root), fetcher

    def _apply(self, doc: DesiredState, job: dict[str, Any]) -> str:
        shadow = doc.raw.get("shadow")
        if self.shadow.end(doc.model, None if shadow else doc.version):  # stops any shadow of this model
            self._phase(job, "promoting")  # the evaluated version is installed: no second download
        if self._already_active(doc):
            # A newer document for what already serves (e.g. the group's final state after this device's
            # wave): nothing to fetch or swap; report it once so the fleet's view stays "active".
            return self._finish(doc, "active")
        downgrade = self._is_downgrade(doc)
        if job.get("phase") != "promoting":
            self._install(doc, job, downgrade)
        if isinstance(shadow, dict):
            self.shadow.start(doc.raw, allow_downgrade=downgrade)
            return self._finish(doc, "healthy", shadow=True)
        self._phase(job, "deploying")
        self.deployer.run_threadsafe(self.deployer.deploy(
            doc.model, doc.version, origin="updater", reason="update", allow_downgrade=downgrade,
            golden=decode_golden(job.get("golden"))))
        self._event(doc, "healthy")
        return self._finish(doc, "rolled-back" if downgrade else "active")

    def _install(self, doc: DesiredState, job: dict[str, Any], downgrade: bool) -> None:
        from tuf.api import exceptions as tuf_errors

        try:
            path, fetcher = self._download(doc, job)
        except tuf_errors.ExpiredMetadataError as exc:
            raise _Transient(f"the fleet's TUF metadata has expired: {exc}") from None
        except tuf_errors.RepositoryError as exc:  # signatures, hashes, rollback, mix-and-match
            raise SecurityError(f"TUF refused the update: {type(exc).__name__}: {str(exc)[:200]}") from None
        except (tuf_errors.DownloadError, SyncError, OSError) as exc:
            raise _Transient(f"download of {doc.target} failed: {exc}") from None
        self._phase(job, "verifying")
        self._event(doc, "verifying")
        install = self._verify(doc, path, fetcher)
        self._phase(job, "installing")
        self._event(doc, "installing")
        self.store.install(install, activate=False, allow_downgrade=downgrade)

    def _already_active(self, doc: DesiredState) -> bool:
        from edgert.errors import StoreError

        try:
            return bool(self.store.entry(doc.model).active == doc.version)
        except StoreError:
            return False

    def _download(self, doc: DesiredState, job: dict[str, Any]) -> tuple[Path, Any]:
        updater, fetcher = self._tuf()
        updater.refresh()
        info = updater.get_targetinfo(doc.target)
        if info is None:
            raise _Transient(f"{doc.target} is not in the fleet's TUF targets (yet)")
        if info.length > MAX_PACKAGE_BYTES:
            raise SecurityError(f"{doc.target} is {info.length} bytes, over the {MAX_PACKAGE_BYTES} allowed")
        # The golden input/output of the health check travel in the (signed) targets metadata.
        custom: dict[str, Any] = info.custom if isinstance(info.custom, dict) else {}
        meta = custom.get("edgert")
        golden = meta.get("golden") if isinstance(meta, dict) else None
        job["golden"] = golden if isinstance(golden, dict) else None
        dest = self._download_path(doc)
        if updater.find_cached_target(info, str(dest)) is None:
            have = sum(p.stat().st_size for p in self.paths.partial.glob("*.part"))
            self._phase(job, "downloading")
            self._event(doc, "downloading", progress=f"{min(have, info.length)}/{info.length}")
            updater.download_target(info, str(dest))
        return dest, fetcher

    def _verify(self, doc: DesiredState, path: Path, fetcher: Any) -> Path:
        from edgert.security.package import read_header

        with open(path, "rb") as f:
            header = read_header(f, doc.target)
        m = header.manifest
        if (m.name, m.version) != (doc.model, doc.version):
            raise SecurityError(f"{doc.target} holds {m.name} {m.version}, not {doc.model} {doc.version}")
        mine = self.store.keys.wrap_fingerprint
        if any(isinstance(r, dict) and r.get("recipient") == mine for r in header.recipients):
            return path
        try:
            raw = fetcher.download_bytes(f"{self.keys_url}{doc.target}", MAX_KEY_RECORD_BYTES)
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise SecurityError(f"the wrapped-key record for {doc.target} is not JSON: {exc}") from None
        except Exception as exc:
            raise _Transient(f"cannot fetch the wrapped-key record for {doc.target}: {exc}") from None
        record = _key_record(record, doc, m.digest)
        if record.get("recipient") != mine:
            raise SecurityError(f"the wrapped-key record for {doc.target} is not for this device ({mine})")
        spliced = path.with_suffix(".spliced")
        add_recipient(path, spliced, record, self.fs)
        return spliced

    def _is_downgrade(self, doc: DesiredState) -> bool:
        from edgert.errors import StoreError
        from edgert.security.package import compare_versions

        try:
            active = self.store.entry(doc.model).active
        except StoreError:
            return False
        return active is not None and compare_versions(doc.version, active) < 0


def _key_record(doc: Any, want: DesiredState, manifest_sha256: str) -> dict[str, Any]:
    """The wrapped-key record inside the fleet's key-record document (edgert.fleet.keyrecords), checked."""
    if isinstance(doc, dict) and isinstance(doc.get("record"), dict):
        if (doc.get("v"), doc.get("target"), doc.get("model"), doc.get("version"),
                doc.get("manifest_sha256")) != (1, want.target, want.model, want.version, manifest_sha256):
            raise SecurityError(f"the wrapped-key record for {want.target} is for another package build")
        doc = doc["record"]
    if not isinstance(doc, dict):
        raise SecurityError(f"the wrapped-key record for {want.target} is not a JSON object")
    return doc


def parse_desired_raw(doc: Mapping[str, Any]) -> DesiredState:
    """A DesiredState from a document already verified (the persisted job)."""
    return DesiredState(int(doc["seq"]), str(doc.get("rollout", ""))[:64], str(doc["model"]),
                        str(doc["version"]), str(doc["target"]), doc)


def decode_golden(doc: Any) -> Any:
    """The health check's (inputs, outputs) from the targets metadata's ``golden`` (base64 .npz files)."""
    import base64
    import binascii
    import io
    import zipfile

    import numpy as np

    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in ("inputs", "outputs")):
        return None
    try:
        arrays = []
        for key in ("inputs", "outputs"):
            with np.load(io.BytesIO(base64.b64decode(doc[key], validate=True)), allow_pickle=False) as npz:
                arrays.append({name: npz[name] for name in npz.files})
    except (ValueError, binascii.Error, OSError, zipfile.BadZipFile) as exc:
        raise SecurityError(f"the golden data in the targets metadata is unreadable: {exc}",
                            hint="re-publish with 'edgert fleet model add --golden IN.npz OUT.npz'") from None
    return arrays[0], arrays[1]
