"""``edgert daemon --check``: resolve everything a config needs without serving, and say what fails.

Each check returns :class:`Finding` records (ok, error or skipped, with a detail and a hint), so the
CLI only prints them. The checks read files, open the keystore and model store, decrypt each
configured model once (wiping the plaintext at once) and try to bind the listen ports; they never
start a listener, load a model into a backend or touch the network beyond loopback binds.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgert.config import DaemonConfig, load_config
from edgert.errors import ConfigError, EdgertError
from edgert.tomlschema import ConfigProblems, parse_listen

__all__ = ["ERROR", "OK", "SKIPPED", "Finding", "check_budget", "check_config", "check_file", "has_errors"]

OK, ERROR, SKIPPED = "ok", "error", "skipped"
#: How long to wait for a daemon that may be answering on the configured Unix socket.
SOCKET_PROBE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``status`` is ok, error or skipped; ``hint`` says what to do next."""

    what: str
    status: str
    detail: str
    hint: str = ""

    def as_dict(self) -> dict[str, str]:
        """JSON-ready form."""
        return asdict(self)


def has_errors(findings: Iterable[Finding]) -> bool:
    """True when any finding is an error."""
    return any(f.status == ERROR for f in findings)


def check_file(
    path: str | os.PathLike[str], adjust: Callable[[DaemonConfig], DaemonConfig] | None = None
) -> list[Finding]:
    """Parse the config at ``path`` (then ``adjust`` it, e.g. CLI overrides) and run every check."""
    try:
        cfg = load_config(path)
        if adjust is not None:
            cfg = adjust(cfg)
    except ConfigProblems as exc:
        findings = [Finding("config", ERROR, p, exc.hint or "") for p in exc.problems]
        return [*findings, Finding("rest", SKIPPED, "the config does not parse; fix it first")]
    except ConfigError as exc:
        return [
            Finding("config", ERROR, exc.message, exc.hint or ""),
            Finding("rest", SKIPPED, "the config does not parse; fix it first"),
        ]
    detail = f"{cfg.source}: {len(cfg.models)} models, {len(cfg.cascades)} cascades"
    return [Finding("config", OK, detail), *check_config(cfg)]


def check_config(cfg: DaemonConfig, *, profile_dirs: list[Path] | None = None) -> list[Finding]:
    """Every check of a parsed config: profile, keys and models, cascades, listeners, MQTT files."""
    findings = [check_profile(cfg, profile_dirs)]
    findings += check_models(cfg)
    findings += check_budget(cfg)
    findings += check_cascades(cfg)
    from edgert.device.pipeline_check import check_pipelines  # [[pipelines]]: chains against members

    findings += check_pipelines(cfg)
    findings += check_listeners(cfg)
    findings += check_mqtt_files(cfg)
    return findings


def check_profile(cfg: DaemonConfig, profile_dirs: list[Path] | None = None) -> Finding:
    """The configured device profile exists (a name among the installed ones, or a .toml path)."""
    from edgert.profiles import available_profiles, load_profile

    try:
        if cfg.profile == "auto":
            names = sorted(available_profiles(profile_dirs))
            return Finding("profile", OK, f"auto: detected at start among {', '.join(names)}")
        profile = load_profile(cfg.profile, profile_dirs)
    except ConfigError as exc:
        return Finding("profile", ERROR, f"daemon.profile: {exc.message}", exc.hint or "")
    return Finding("profile", OK, f"{profile.name} ({profile.source})")


def _state_root(cfg: DaemonConfig) -> Path:
    from edgert.paths import state_dir

    return state_dir(cfg.state_dir or None)


def check_models(cfg: DaemonConfig) -> list[Finding]:
    """Keys load, each store model is installed and decrypts, each plaintext model file is readable."""
    findings = [_check_plaintext(m.name, m.path) for m in cfg.models if not m.from_store]
    store_models = [m for m in cfg.models if m.from_store]
    root = _state_root(cfg)
    keys_finding, keys = _open_keys(root, needed=bool(store_models))
    findings.insert(0, keys_finding)
    if keys is None:
        why = f"keys unavailable ({keys_finding.detail})"
        findings += [Finding(f"model {m.name}", SKIPPED, why) for m in store_models]
        return findings
    if not store_models:
        return findings
    from edgert.security.loader import open_store

    try:
        store = open_store(root, keys)
        installed = {e.name: e for e in store.entries()}
    except EdgertError as exc:
        findings.append(Finding("store", ERROR, exc.message, exc.hint or ""))
        return findings
    for m in store_models:
        findings.append(_check_store_model(store, installed, m.name, m.version, root))
    return findings


def check_budget(cfg: DaemonConfig) -> list[Finding]:
    """Under ``[daemon] memory_budget_mb``: no model is bigger than the budget, and the pinned ones fit.

    What is knowable without loading is a lower bound: a model's footprint is at least the decrypted size
    of its smallest variant (from the signed manifest; nothing is decrypted). The daemon measures the
    real footprint at load and refuses there what this cannot see.
    """
    if cfg.memory_budget_mb <= 0:
        return []
    from edgert.device.budget import MIB, mb

    budget = int(cfg.memory_budget_mb * MIB)
    key = f"daemon.memory_budget_mb = {cfg.memory_budget_mb:g}"
    sizes, skipped = _lower_bounds(cfg)
    findings = []
    for name, size in sizes.items():
        if size > budget:
            findings.append(Finding(f"budget {name}", ERROR, f"model {name!r} needs at least {mb(size)} "
                                    f"(its decrypted size), more than {key}",
                                    "raise memory_budget_mb or serve a smaller variant"))
    pinned = {m.name: sizes.get(m.name, 0) for m in cfg.models if m.pin}
    need = sum(pinned.values())
    if need > budget:
        listed = ", ".join(f"{n} {mb(b)}" for n, b in pinned.items())
        findings.append(Finding("budget", ERROR, f"{key} is too small for the pinned models, which need at "
                                f"least {mb(need)} ({listed})",
                                "raise memory_budget_mb, or set pin = false on some models"))
    if not findings:
        known = f"pinned models need at least {mb(need)}; " if pinned else ""
        largest = max(sizes.values(), default=0)
        unsized = f"; not sized: {skipped}" if skipped else ""
        findings.append(Finding("budget", OK, f"{mb(budget)}: {known}largest model at least {mb(largest)} "
                                f"(footprints are measured at load){unsized}"))
    return findings


def _lower_bounds(cfg: DaemonConfig) -> tuple[dict[str, int], str]:
    """Each model's smallest decrypted variant size (bytes), and which models could not be sized."""
    sizes: dict[str, int] = {}
    for m in cfg.models:
        if not m.from_store:
            try:
                sizes[m.name] = os.stat(m.path).st_size
            except OSError:
                pass
    store_models = [m for m in cfg.models if m.from_store]
    root = _state_root(cfg)
    _, keys = _open_keys(root, needed=bool(store_models))
    if keys is not None and store_models:
        from edgert.security.loader import open_store

        try:
            store = open_store(root, keys)
            for m in store_models:
                try:
                    manifest = store.header(m.name, m.version or None).manifest
                except EdgertError:
                    continue  # check_models says why
                sizes[m.name] = min(v.plaintext_size for v in manifest.variants)
        except EdgertError:
            pass
    return sizes, ", ".join(m.name for m in cfg.models if m.name not in sizes)


def _open_keys(root: Path, *, needed: bool) -> tuple[Finding, Any]:
    from edgert.paths import keys_dir
    from edgert.security.loader import open_keystore

    init = f"edgert keys init --state-dir {root}"
    if not root.exists():
        status = ERROR if needed else SKIPPED
        return Finding("keys", status, f"state dir {root} does not exist", f"run `{init}`"), None
    if not keys_dir(root).exists():
        status = ERROR if needed else SKIPPED
        return Finding("keys", status, f"no device keys in {keys_dir(root)}", f"run `{init}`"), None
    try:
        keys = open_keystore(root)
    except PermissionError as exc:
        return Finding(
            "keys",
            SKIPPED,
            f"cannot read {exc.filename or root} as uid {os.getuid()}",
            "run the check as the daemon's user (e.g. sudo -u edgert)",
        ), None
    except EdgertError as exc:
        return Finding("keys", ERROR, exc.message, exc.hint or ""), None
    return Finding("keys", OK, f"device keys in {keys_dir(root)}"), keys


def _check_store_model(
    store: Any, installed: dict[str, Any], name: str, version: str, root: Path
) -> Finding:
    from edgert.security.membuf import wipe

    what = f"model {name}"
    entry = installed.get(name)
    if entry is None or not entry.installed:
        have = ", ".join(sorted(n for n, e in installed.items() if e.installed)) or "none"
        return Finding(
            what,
            ERROR,
            f"{name!r} is not installed in the store at {root} (installed: {have})",
            f"run `edgert models import FILE --name {name} --state-dir {root}`",
        )
    wanted = version or entry.active
    if wanted is None:
        return Finding(
            what,
            ERROR,
            f"{name!r} has no active version (installed: {', '.join(entry.installed)})",
            f"run `edgert models activate {name} VERSION`",
        )
    if wanted not in entry.installed:
        return Finding(
            what,
            ERROR,
            f"version {wanted} of {name!r} is not installed (installed: {', '.join(entry.installed)})",
            "fix models.version or import that version",
        )
    try:
        manifest, data = store.read_model_bytes(name, wanted)
    except EdgertError as exc:
        return Finding(what, ERROR, f"version {wanted} does not decrypt: {exc.message}", exc.hint or "")
    size = len(data)
    wipe(data)
    del data
    return Finding(what, OK, f"version {wanted} decrypts ({size} bytes, {manifest.variant})")


def _check_plaintext(name: str, path: str) -> Finding:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return Finding(
            f"model {name}",
            ERROR,
            f"cannot read plaintext model {path}: {exc.strerror}",
            "fix models.path",
        )
    return Finding(f"model {name}", OK, f"plaintext file {path} is readable")


def check_cascades(cfg: DaemonConfig) -> list[Finding]:
    """Cascades name served models (the parser already refused any that do not)."""
    served = {m.name for m in cfg.models}
    out = []
    for c in cfg.cascades:
        missing = [n for n in (c.small, c.large) if n not in served]
        if missing:
            out.append(
                Finding(f"cascade {c.name}", ERROR, f"names unserved models {', '.join(missing)}")
            )
        else:
            out.append(
                Finding(f"cascade {c.name}", OK, f"{c.small} -> {c.large} ({c.rule} >= {c.threshold:g})")
            )
    return out


def check_listeners(cfg: DaemonConfig) -> list[Finding]:
    """The HTTP and metrics ports can be bound, and the Unix socket path is usable and not taken."""
    return [
        _check_port("http", cfg.http.listen),
        _check_port("metrics", cfg.metrics.listen),
        check_socket_path(cfg.socket.path),
    ]


def _check_port(what: str, listen: str) -> Finding:
    if not listen:
        return Finding(what, SKIPPED, "listener disabled")
    host, port = parse_listen(listen)
    if port == 0:
        return Finding(what, OK, f"{listen}: port 0 picks a free port at start")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return Finding(
            what, ERROR, f"{listen}: cannot resolve {host!r}: {exc.strerror}", f"fix {what}.listen"
        )
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
            try:
                s.bind(addr)
            except OSError as exc:
                reason = {
                    errno.EADDRINUSE: "is already in use",
                    errno.EACCES: "needs privileges to bind",
                    errno.EADDRNOTAVAIL: "is not an address of this machine",
                }.get(exc.errno or 0)
                detail = f"{listen} {reason}" if reason else f"cannot bind {listen}: {exc.strerror}"
                return Finding(what, ERROR, detail, f"stop what uses it or change {what}.listen")
    return Finding(what, OK, f"{listen} is free")


def check_socket_path(path: str) -> Finding:
    """The socket's directory is (or can be made) writable, and no live daemon answers on it."""
    if not path:
        return Finding("socket", SKIPPED, "listener disabled")
    p = Path(path)
    existing = p.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        made = "" if existing == p.parent else f" (to create {p.parent})"
        return Finding(
            "socket",
            ERROR,
            f"{existing} is not writable by uid {os.getuid()}{made}",
            "run as the daemon's user, or change socket.path",
        )
    if p.exists() or p.is_symlink():
        if not stat.S_ISSOCK(p.lstat().st_mode):
            return Finding(
                "socket", ERROR, f"{p} exists and is not a socket", "choose another socket.path"
            )
        if _answers(p):
            return Finding(
                "socket",
                ERROR,
                f"a live daemon answers on {p}",
                "stop it first, or give this daemon another socket.path",
            )
        return Finding("socket", OK, f"{p} is a stale socket; the daemon replaces it")
    if existing != p.parent:
        return Finding("socket", OK, f"{p.parent} can be created ({existing} is writable)")
    return Finding("socket", OK, f"{p.parent} is writable")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(SOCKET_PROBE_TIMEOUT_S)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def check_mqtt_files(cfg: DaemonConfig) -> list[Finding]:
    """The MQTT CA, certificate, key, password and command-key files exist and are readable."""
    if cfg.mqtt is None:
        return [Finding("mqtt", SKIPPED, "no [mqtt] table: fleet sync is off")]
    b, s = cfg.mqtt.broker, cfg.mqtt.sync
    files = {
        "ca_file": b.ca_file,
        "cert_file": b.cert_file,
        "key_file": b.key_file,
        "password_file": b.password_file,
        "command_key_file": s.command_key_file,
    }
    secret = {"key_file", "password_file"}
    out = []
    for key, value in files.items():
        if value is None:
            continue
        out.append(_check_readable(f"mqtt.{key}", value, private=key in secret))
    if not out:
        out.append(
            Finding("mqtt", OK, f"{b.host}:{b.port}: no files to check (plain MQTT, no credentials)")
        )
    return out


def _check_readable(what: str, path: str, *, private: bool) -> Finding:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return Finding(
            what, ERROR, f"cannot read {path}: {exc.strerror}", f"fix [mqtt] {what.split('.')[1]}"
        )
    if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        return Finding(
            what, ERROR, f"{path} is readable by others; the link refuses it", f"chmod 600 {path}"
        )
    return Finding(what, OK, f"{path} is readable")
