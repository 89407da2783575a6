"""Daemon configuration: TOML -> frozen dataclasses, with errors that name the file, key and allowed values.

Parsing is pure (:func:`parse_config` takes text); only :func:`load_config` reads a file. Nothing here
touches the network, the model store or the filesystem beyond that one read.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from edgert.drift.monitor import DriftSettings
from edgert.engine.config import ModelConfig
from edgert.engine.pipeline_config import PipelineConfig, check_references, parse_pipeline
from edgert.errors import ConfigError
from edgert.runtime import ModelOptions
from edgert.serve.http_server import HttpLimits
from edgert.serve.uds_limits import UdsLimits
from edgert.tomlschema import Problems, Table, parse_listen

if TYPE_CHECKING:
    from edgert.device.sync_config import MqttSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 images
    import tomli as tomllib

__all__ = [
    "CascadeEntry",
    "DaemonConfig",
    "HttpConfig",
    "MetricsConfig",
    "ModelEntry",
    "SocketConfig",
    "load_config",
    "parse_config",
    "parse_listen",
]

DEFAULT_HTTP_LISTEN = "127.0.0.1:8000"
DEFAULT_METRICS_LISTEN = "127.0.0.1:9100"
DEFAULT_SOCKET_PATH = "/run/edgert/edgert.sock"
CASCADE_RULES = ("max_softmax", "margin")
NAN_POLICIES = ("allow", "reject")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOAD_MODES = ("eager", "lazy")  # [[models]] load: at start, or on the first request (docs/memory.md)
CONFIG_HINT = "see packaging/edgert.toml for an example"
_PLACEHOLDER_NAME = "invalid-name"


@dataclass(frozen=True)
class HttpConfig:
    """The OIP v2 REST listener."""

    listen: str = DEFAULT_HTTP_LISTEN  # "" disables the listener
    auth_token_file: str = ""  # bearer token; required when binding a non-loopback address
    limits: HttpLimits = field(default_factory=HttpLimits)  # declared once, by the server


@dataclass(frozen=True)
class SocketConfig:
    """The Unix-socket fast path."""

    path: str = DEFAULT_SOCKET_PATH  # "" disables the listener
    mode: int = 0o660
    owner: str = ""
    group: str = ""
    limits: UdsLimits = field(default_factory=UdsLimits)  # declared once, by the server


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus listener."""

    listen: str = DEFAULT_METRICS_LISTEN  # "" disables


@dataclass(frozen=True)
class ModelEntry:
    """One served model: where it comes from, plus its serving settings (declared once, in ModelConfig)."""

    name: str
    path: str = ""  # plaintext file; needs daemon.allow_plaintext
    version: str = ""  # store version; "" = the active one
    threads: int = 0  # 0 = the profile's choice
    drift: DriftSettings = field(default_factory=DriftSettings)  # [models.drift]; docs/drift.md
    serving: ModelConfig | None = None  # None = the engine's defaults for this name
    load: str = "eager"  # "eager": at start; "lazy": on the first request (docs/memory.md)
    pin: bool = False  # never unloaded to make room under daemon.memory_budget_mb

    def __post_init__(self) -> None:
        if self.serving is None:
            object.__setattr__(self, "serving", ModelConfig(name=self.name))
        elif self.serving.name != self.name:
            raise ConfigError(f"model {self.name!r}: serving settings are for {self.serving.name!r}")

    @property
    def settings(self) -> ModelConfig:
        """The engine's serving settings for this model (batching, cache, limits, NaN policy)."""
        assert self.serving is not None  # set in __post_init__
        return self.serving

    @property
    def from_store(self) -> bool:
        """True when the model is read from the encrypted store."""
        return not self.path

    def runtime_options(self) -> ModelOptions:
        """The runtime's load options, derived from the serving settings (nothing declared twice)."""
        s = self.settings
        return ModelOptions(max_batch=s.max_batch_size or None, nan_policy=s.nan_policy,
                            threads=self.threads or None)


@dataclass(frozen=True)
class CascadeEntry:
    """A small->large cascade served under its own name."""

    name: str
    small: str
    large: str
    rule: str = "max_softmax"
    threshold: float = 0.9
    output: str = "logits"


@dataclass(frozen=True)
class DaemonConfig:
    """The whole daemon configuration."""

    source: str = "<default>"
    profile: str = "auto"
    state_dir: str = ""  # "" = edgert.paths.state_dir()
    allow_plaintext: bool = False
    drain_timeout_s: float = 10.0
    hang_timeout_s: float = 30.0
    log_level: str = "info"
    http: HttpConfig = field(default_factory=HttpConfig)
    socket: SocketConfig = field(default_factory=SocketConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    models: tuple[ModelEntry, ...] = ()
    cascades: tuple[CascadeEntry, ...] = ()
    pipelines: tuple[PipelineConfig, ...] = ()  # [[pipelines]] (edgert/engine/pipeline_config.py)
    mqtt: MqttSettings | None = None  # the parsed [mqtt] table; None = no fleet sync
    #: [security] trusted_publishers: fleet publisher keys ("ed25519:<base64>") pinned by config, in
    #: addition to those pinned in the state directory with `edgert keys trust`.
    trusted_publishers: tuple[str, ...] = ()
    #: [daemon] slow_request_ms: requests slower than this log one JSON line with their stages
    #: (0 logs every request; a negative value turns the log off). See docs/observability.md.
    slow_request_ms: float = 100.0
    #: [daemon] memory_budget_mb: loaded models' measured footprints stay under it (0 = no budget).
    memory_budget_mb: float = 0.0


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_http(table: Table) -> HttpConfig:
    d = HttpLimits()
    cfg = HttpConfig(
        listen=table.listen("listen", DEFAULT_HTTP_LISTEN),
        auth_token_file=table.string("auth_token_file"),
        limits=HttpLimits(
            max_body_bytes=table.integer("max_body_bytes", d.max_body_bytes, minimum=1024),
            max_header_bytes=table.integer("max_header_bytes", d.max_header_bytes, minimum=1024),
            read_timeout_s=table.number("read_timeout_s", d.read_timeout_s, minimum=0.01),
            keepalive_timeout_s=table.number("keepalive_timeout_s", d.keepalive_timeout_s, minimum=0.01),
            max_connections=table.integer("max_connections", d.max_connections, minimum=1),
            write_timeout_s=table.number("write_timeout_s", d.write_timeout_s, minimum=0.01),
        ),
    )
    table.check_unknown()
    if cfg.listen and not cfg.auth_token_file and not is_loopback(parse_listen(cfg.listen)[0]):
        table.fail(
            "listen",
            f"binds the non-loopback address {cfg.listen!r} without http.auth_token_file; "
            "set auth_token_file (a 0600 file holding a bearer token) or bind 127.0.0.1",
        )
    return cfg


def _parse_socket(table: Table) -> SocketConfig:
    u = UdsLimits()
    cfg = SocketConfig(
        path=table.string("path", DEFAULT_SOCKET_PATH),
        mode=table.octal_mode("mode", SocketConfig.mode),
        owner=table.string("owner"),
        group=table.string("group"),
        limits=UdsLimits(
            # 0 (default) sizes the frame cap from the served models' inputs
            max_frame_bytes=table.integer("max_frame_bytes", 0, minimum=0) or None,
            read_timeout_s=table.number("read_timeout_s", u.read_timeout_s, minimum=0.01),
            idle_timeout_s=table.number("idle_timeout_s", u.idle_timeout_s, minimum=0.01),
            write_timeout_s=table.number("write_timeout_s", u.write_timeout_s, minimum=0.01),
            max_connections=table.integer("max_connections", u.max_connections, minimum=1),
            max_buffered_bytes=table.integer("max_buffered_bytes", u.max_buffered_bytes, minimum=1 << 20),
        ),
    )
    table.check_unknown()
    return cfg


def _parse_metrics(table: Table) -> MetricsConfig:
    cfg = MetricsConfig(listen=table.listen("listen", DEFAULT_METRICS_LISTEN))
    table.check_unknown()
    return cfg


def _parse_model(table: Table, allow_plaintext: bool) -> ModelEntry:
    name = table.string("name", required=True)
    if "name" in table.data and (not name or "/" in name or name.strip() != name):
        table.fail("name", f"must be a non-empty name without '/' or spaces, got {name!r}")
    sizes = table.list_of("preferred_batch_sizes", int, what="a positive integer")
    for i, size in enumerate(sizes):
        if size <= 0:
            table.problems.add(f"{table.where('preferred_batch_sizes')}[{i}]",
                               f"must be a positive integer, got {size}")
    valid_name = bool(name) and "/" not in name and name.strip() == name
    # A bad name was recorded above; a placeholder keeps the checks below running.
    name = name if valid_name else _PLACEHOLDER_NAME
    max_batch_size = table.integer("max_batch_size", ModelConfig.max_batch_size)
    max_queue_delay_us = table.integer("max_queue_delay_us", ModelConfig.max_queue_delay_us)
    cache_bytes = table.integer("cache_bytes", ModelConfig.cache_bytes)
    max_in_flight = table.integer("max_in_flight", ModelConfig.max_in_flight, minimum=1)
    max_queue = table.integer("max_queue", ModelConfig.max_queue, minimum=1)
    nan_policy = table.choice("nan_policy", ModelConfig.nan_policy, NAN_POLICIES)
    try:
        serving = ModelConfig(
            name=name, max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us,
            preferred_batch_sizes=tuple(s for s in sizes if s > 0), cache_bytes=cache_bytes,
            max_in_flight=max_in_flight, max_queue=max_queue, nan_policy=nan_policy,
        )
    except ConfigError as exc:  # cross-field rules live with the engine (e.g. batch sizes <= max)
        table.fail("preferred_batch_sizes", exc.message)
        serving = ModelConfig(name=name)
    entry = ModelEntry(
        name=name,
        path=table.string("path"),
        version=table.string("version"),
        threads=table.integer("threads", 0),
        drift=_parse_drift(table.table("drift")),
        serving=serving,
        load=table.choice("load", "eager", LOAD_MODES),
        pin=table.boolean("pin", False),
    )
    table.check_unknown()
    if entry.path and not allow_plaintext:
        table.fail(
            "path",
            "names a plaintext model file but daemon.allow_plaintext is false; "
            "import the model into the encrypted store (edgert models import) or set allow_plaintext = true",
        )
    if entry.path and entry.version:
        table.fail("version", "only applies to store models; remove it or remove path")
    return entry


def _parse_drift(table: Table) -> DriftSettings:
    """``[models.drift]``: live drift against the package's reference profile (docs/drift.md)."""
    d = DriftSettings()
    values = dict(
        enabled=table.boolean("enabled", d.enabled),
        window=table.integer("window", d.window),
        window_s=table.number("window_s", d.window_s),
        min_samples=table.integer("min_samples", d.min_samples),
        psi_threshold=table.number("psi_threshold", d.psi_threshold),
        js_threshold=table.number("js_threshold", d.js_threshold, maximum=1.0),
        confidence_drop=table.number("confidence_drop", d.confidence_drop),
        event_interval_s=table.number("event_interval_s", d.event_interval_s),
        capture_samples=table.integer("capture_samples", d.capture_samples),
        capture_fleet_key=table.string("capture_fleet_key"),
        panes=table.integer("panes", d.panes, minimum=2),
        sample_every=table.integer("sample_every", d.sample_every, minimum=1),
    )
    table.check_unknown()
    if values["capture_fleet_key"]:
        from edgert.errors import EdgertError
        from edgert.security.keys import parse_public_key

        try:
            parse_public_key(str(values["capture_fleet_key"]))
        except EdgertError as exc:
            table.fail("capture_fleet_key", f"is not an x25519 public key ({exc.message})")
            values["capture_fleet_key"] = ""
    try:
        return DriftSettings(**values)  # type: ignore[arg-type]
    except ConfigError as exc:  # cross-field rules (one of window/window_s) live with the settings
        table.fail("window", exc.message)
        return d


def _parse_cascade(table: Table) -> CascadeEntry:
    entry = CascadeEntry(
        name=table.string("name", required=True, nonempty=True),
        small=table.string("small", required=True, nonempty=True),
        large=table.string("large", required=True, nonempty=True),
        rule=table.choice("rule", "max_softmax", CASCADE_RULES),
        threshold=table.number("threshold", 0.9),
        output=table.string("output", "logits"),
    )
    table.check_unknown()
    return entry


def parse_config(text: str, source: str = "<config>") -> DaemonConfig:
    """Parse and validate TOML text into a :class:`DaemonConfig` (pure: no I/O).

    Every problem is collected; the ConfigError raised lists all of them, one per line.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", hint="check quoting and brackets") from None
    problems = Problems(source, hint=CONFIG_HINT)
    root = problems.table(data)
    daemon = root.table("daemon")
    allow_plaintext = daemon.boolean("allow_plaintext", False)
    cfg = DaemonConfig(
        source=source,
        profile=daemon.string("profile", "auto") or "auto",
        state_dir=daemon.string("state_dir"),
        allow_plaintext=allow_plaintext,
        drain_timeout_s=daemon.number("drain_timeout_s", 10.0),
        hang_timeout_s=daemon.number("hang_timeout_s", 30.0, minimum=0.1),
        log_level=daemon.choice("log_level", "info", LOG_LEVELS),
        http=_parse_http(root.table("http")),
        socket=_parse_socket(root.table("socket")),
        metrics=_parse_metrics(root.table("metrics")),
        models=tuple(_parse_model(t, allow_plaintext) for t in root.tables("models")),
        cascades=tuple(_parse_cascade(t) for t in root.tables("cascades")),
        mqtt=_parse_mqtt(root) if root.has("mqtt") else None,
        trusted_publishers=_parse_security(root.table("security")),
        slow_request_ms=daemon.number("slow_request_ms", 100.0, minimum=None),
        memory_budget_mb=daemon.number("memory_budget_mb", 0.0, minimum=0.0),
    )
    cfg = _with_pipelines(root, cfg)
    daemon.check_unknown()
    root.check_unknown()
    _check_names(root, cfg)
    _check_lazy_members(root, cfg)
    problems.raise_if_any()
    return cfg


def _parse_security(table: Table) -> tuple[str, ...]:
    """``[security] trusted_publishers``: well-formed ``ed25519:<base64 of 32 bytes>`` strings."""
    import base64
    import binascii

    keys = table.list_of("trusted_publishers", str, what='an "ed25519:<base64>" publisher key')
    for i, key in enumerate(keys):
        try:
            ok = key.startswith("ed25519:") and len(base64.b64decode(key[8:], validate=True)) == 32
        except (binascii.Error, ValueError):
            ok = False
        if not ok:
            table.fail(f"trusted_publishers[{i}]", "must be an Ed25519 key 'ed25519:<base64>' (as printed "
                                                    f"by 'edgert package keygen'), got {key[:60]!r}")
    table.check_unknown()
    return keys


def _parse_mqtt(root: Table) -> MqttSettings:
    # Imported here: edgert.device's package import pulls in the daemon, which imports this module.
    from edgert.device.sync_config import parse_mqtt

    return parse_mqtt(root.table("mqtt"))


def _with_pipelines(root: Table, cfg: DaemonConfig) -> DaemonConfig:
    """``[[pipelines]]``: parsed, and their model/cascade stages must name configured ones."""
    from dataclasses import replace

    pipelines = []
    for table in root.tables("pipelines"):
        pipeline = parse_pipeline(table)
        if pipeline is not None:
            check_references(table, pipeline, (m.name for m in cfg.models), (c.name for c in cfg.cascades))
            pipelines.append(pipeline)
    return replace(cfg, pipelines=tuple(pipelines))


def _check_names(root: Table, cfg: DaemonConfig) -> None:
    """Model and cascade names must be unique, and cascades must name served models."""
    seen: set[str] = set()
    for kind, name in [("models", m.name) for m in cfg.models] + [("cascades", c.name) for c in cfg.cascades]:
        if name and name != _PLACEHOLDER_NAME and name in seen:
            root.fail(kind, f"serves the name {name!r} twice; names must be unique")
        seen.add(name)
    for pipeline in cfg.pipelines:
        if pipeline.name in seen:
            root.fail("pipelines", f"serves the name {pipeline.name!r} twice; names must be unique")
        seen.add(pipeline.name)
    models = {m.name for m in cfg.models}
    for i, cascade in enumerate(cfg.cascades):
        for key in ("small", "large"):
            target = getattr(cascade, key)
            if target and target not in models:
                allowed = ", ".join(sorted(models)) or "(no models configured)"
                root.fail(
                    f"cascades[{i}].{key}", f"names {target!r}, which is not a model (allowed: {allowed})"
                )


def _check_lazy_members(root: Table, cfg: DaemonConfig) -> None:
    """Cascades and pipelines serve only while their members do, so members load at start and stay."""
    lazy = {m.name for m in cfg.models if m.load == "lazy"}
    for i, cascade in enumerate(cfg.cascades):
        for key in ("small", "large"):
            member = getattr(cascade, key)
            if member in lazy:
                root.fail(f"cascades[{i}].{key}", f'names {member!r}, which has load = "lazy"; cascade '
                          'members must have load = "eager" (allowed for members: eager)')
    for i, pipeline in enumerate(cfg.pipelines):
        for member in pipeline.members:
            if member in lazy:
                root.fail(f"pipelines[{i}].stages", f'stage model {member!r} has load = "lazy"; pipeline '
                          'members must have load = "eager" (allowed for members: eager)')


def load_config(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file {p} does not exist", hint="pass --config PATH or run `edgert demo`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    return parse_config(text, str(p))
