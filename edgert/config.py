"""Daemon configuration: TOML -> frozen dataclasses, with errors that name the file, key and allowed values.

Parsing is pure (:func:`parse_config` takes text); only :func:`load_config` reads a file. Nothing here
touches the network, the model store or the filesystem beyond that one read.
"""

from __future__ import annotations

import ipaddress
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgert.engine.config import ModelConfig
from edgert.errors import ConfigError
from edgert.runtime import ModelOptions

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


@dataclass(frozen=True)
class HttpConfig:
    """The OIP v2 REST listener."""

    listen: str = DEFAULT_HTTP_LISTEN  # "" disables the listener
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 16 * 1024
    read_timeout_s: float = 30.0  # a request must arrive completely within this (slowloris guard)
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    auth_token_file: str = ""  # bearer token; required when binding a non-loopback address


@dataclass(frozen=True)
class SocketConfig:
    """The Unix-socket fast path."""

    path: str = DEFAULT_SOCKET_PATH  # "" disables the listener
    mode: int = 0o660
    owner: str = ""
    group: str = ""
    max_frame_bytes: int = 256 * 1024 * 1024


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
    serving: ModelConfig | None = None  # None = the engine's defaults for this name

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
    mqtt: dict[str, Any] | None = None  # handed as-is to the sync service when present


class _Table:
    """Typed access to one TOML table that remembers where it came from and which keys were used."""

    def __init__(self, source: str, prefix: str, data: Any) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: [{prefix}] must be a table", hint="see packaging/edgert.toml")
        self.source, self.prefix, self.data = source, prefix, data
        self.used: set[str] = set()

    def _where(self, key: str) -> str:
        return f"{self.source}: {self.prefix}.{key}" if self.prefix else f"{self.source}: {key}"

    def fail(self, key: str, what: str) -> ConfigError:
        """An error naming the file and key."""
        return ConfigError(f"{self._where(key)} {what}", hint="see packaging/edgert.toml for an example")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        """The value of ``key`` checked against ``kind`` (bool is never accepted as a number)."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail(key, f"must be {_kind_name(kinds)}, got {value!r}")
        if not isinstance(value, kinds):
            raise self.fail(key, f"must be {_kind_name(kinds)}, got {type(value).__name__} {value!r}")
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        """A finite number >= minimum."""
        value = float(self.get(key, (int, float), default))
        if not math.isfinite(value) or value < minimum:
            raise self.fail(key, f"must be a number >= {minimum:g}, got {value!r}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        """An integer >= minimum."""
        value = int(self.get(key, int, default))
        if value < minimum:
            raise self.fail(key, f"must be an integer >= {minimum}, got {value}")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        """A string from ``allowed``."""
        value = str(self.get(key, str, default))
        if value not in allowed:
            raise self.fail(key, f"must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def check_unknown(self) -> None:
        """Refuse keys nobody asked for (typos would otherwise be silently ignored)."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            allowed = ", ".join(sorted(self.used))
            raise self.fail(unknown[0], f"is not a known key (allowed: {allowed})")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:8000`` for IPv6) into host and port; raises ValueError."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(table: _Table, key: str, default: str) -> str:
    value = str(table.get(key, str, default))
    if value:
        try:
            parse_listen(value)
        except ValueError as exc:
            raise table.fail(key, f"is not a valid listen address: {exc}") from None
    return value


def _parse_http(table: _Table) -> HttpConfig:
    cfg = HttpConfig(
        listen=_listen(table, "listen", DEFAULT_HTTP_LISTEN),
        max_body_bytes=table.integer("max_body_bytes", HttpConfig.max_body_bytes, minimum=1024),
        max_header_bytes=table.integer("max_header_bytes", HttpConfig.max_header_bytes, minimum=1024),
        read_timeout_s=table.number("read_timeout_s", HttpConfig.read_timeout_s, minimum=0.01),
        keepalive_timeout_s=table.number("keepalive_timeout_s", HttpConfig.keepalive_timeout_s, minimum=0.01),
        max_connections=table.integer("max_connections", HttpConfig.max_connections, minimum=1),
        auth_token_file=str(table.get("auth_token_file", str, "")),
    )
    table.check_unknown()
    if cfg.listen and not cfg.auth_token_file and not is_loopback(parse_listen(cfg.listen)[0]):
        raise table.fail(
            "listen",
            f"binds the non-loopback address {cfg.listen!r} without http.auth_token_file; "
            "set auth_token_file (a 0600 file holding a bearer token) or bind 127.0.0.1",
        )
    return cfg


def _parse_socket(table: _Table) -> SocketConfig:
    mode_value = table.get("mode", (str, int), "0660")
    try:
        mode = int(mode_value, 8) if isinstance(mode_value, str) else int(mode_value)
    except ValueError:
        raise table.fail("mode", f'must be an octal string like "0660", got {mode_value!r}') from None
    if not 0 <= mode <= 0o777:
        raise table.fail("mode", f"must be between 0000 and 0777, got {oct(mode)}")
    cfg = SocketConfig(
        path=str(table.get("path", str, DEFAULT_SOCKET_PATH)),
        mode=mode,
        owner=str(table.get("owner", str, "")),
        group=str(table.get("group", str, "")),
        max_frame_bytes=table.integer("max_frame_bytes", SocketConfig.max_frame_bytes, minimum=1024),
    )
    table.check_unknown()
    return cfg


def _parse_model(table: _Table, allow_plaintext: bool) -> ModelEntry:
    name = str(table.get("name", str, ""))
    if not name or "/" in name or name.strip() != name:
        raise table.fail("name", f"must be a non-empty name without '/' or spaces, got {name!r}")
    sizes = table.get("preferred_batch_sizes", list, [])
    if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise table.fail("preferred_batch_sizes", f"must be a list of positive integers, got {sizes!r}")
    entry = ModelEntry(
        name=name,
        path=str(table.get("path", str, "")),
        version=str(table.get("version", str, "")),
        threads=table.integer("threads", 0),
        serving=ModelConfig(
            name=name,
            max_batch_size=table.integer("max_batch_size", ModelConfig.max_batch_size),
            max_queue_delay_us=table.integer("max_queue_delay_us", ModelConfig.max_queue_delay_us),
            preferred_batch_sizes=tuple(sizes),
            cache_bytes=table.integer("cache_bytes", ModelConfig.cache_bytes),
            max_in_flight=table.integer("max_in_flight", ModelConfig.max_in_flight, minimum=1),
            max_queue=table.integer("max_queue", ModelConfig.max_queue, minimum=1),
            nan_policy=table.choice("nan_policy", ModelConfig.nan_policy, NAN_POLICIES),
        ),
    )
    table.check_unknown()
    if entry.path and not allow_plaintext:
        raise table.fail(
            "path",
            "names a plaintext model file but daemon.allow_plaintext is false; "
            "import the model into the encrypted store (edgert models import) or set allow_plaintext = true",
        )
    if entry.path and entry.version:
        raise table.fail("version", "only applies to store models; remove it or remove path")
    return entry


def _parse_cascade(table: _Table) -> CascadeEntry:
    entry = CascadeEntry(
        name=str(table.get("name", str, "")),
        small=str(table.get("small", str, "")),
        large=str(table.get("large", str, "")),
        rule=table.choice("rule", "max_softmax", CASCADE_RULES),
        threshold=table.number("threshold", 0.9),
        output=str(table.get("output", str, "logits")),
    )
    for key in ("name", "small", "large"):
        if not getattr(entry, key):
            raise table.fail(key, "is required")
    table.check_unknown()
    return entry


def _list_of_tables(root: _Table, key: str) -> list[_Table]:
    items = root.get(key, list, [])
    return [_Table(root.source, f"{key}[{i}]", item) for i, item in enumerate(items)]


def parse_config(text: str, source: str = "<config>") -> DaemonConfig:
    """Parse and validate TOML text into a :class:`DaemonConfig` (pure: no I/O)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}", hint="check quoting and brackets") from None
    root = _Table(source, "", data)
    daemon = _Table(source, "daemon", root.get("daemon", dict, {}))
    allow_plaintext = bool(daemon.get("allow_plaintext", bool, False))
    profile = str(daemon.get("profile", str, "auto")) or "auto"
    cfg = DaemonConfig(
        source=source,
        profile=profile,
        state_dir=str(daemon.get("state_dir", str, "")),
        allow_plaintext=allow_plaintext,
        drain_timeout_s=daemon.number("drain_timeout_s", 10.0),
        hang_timeout_s=daemon.number("hang_timeout_s", 30.0, minimum=0.1),
        log_level=daemon.choice("log_level", "info", LOG_LEVELS),
        http=_parse_http(_Table(source, "http", root.get("http", dict, {}))),
        socket=_parse_socket(_Table(source, "socket", root.get("socket", dict, {}))),
        metrics=_parse_metrics(_Table(source, "metrics", root.get("metrics", dict, {}))),
        models=tuple(_parse_model(t, allow_plaintext) for t in _list_of_tables(root, "models")),
        cascades=tuple(_parse_cascade(t) for t in _list_of_tables(root, "cascades")),
        mqtt=dict(root.get("mqtt", dict, {})) or None,
    )
    daemon.check_unknown()
    root.check_unknown()
    _check_names(root, cfg)
    if cfg.mqtt is not None:
        from edgert.mqtt.config import MqttConfig

        MqttConfig.from_dict(cfg.mqtt, source)  # validate now; the daemon builds the sync service from it
    return cfg


def _parse_metrics(table: _Table) -> MetricsConfig:
    cfg = MetricsConfig(listen=_listen(table, "listen", DEFAULT_METRICS_LISTEN))
    table.check_unknown()
    return cfg


def _check_names(root: _Table, cfg: DaemonConfig) -> None:
    """Model and cascade names must be unique, and cascades must name served models."""
    seen: set[str] = set()
    for kind, name in [("models", m.name) for m in cfg.models] + [("cascades", c.name) for c in cfg.cascades]:
        if name in seen:
            raise root.fail(kind, f"serves the name {name!r} twice; names must be unique")
        seen.add(name)
    models = {m.name for m in cfg.models}
    for i, cascade in enumerate(cfg.cascades):
        for key in ("small", "large"):
            target = getattr(cascade, key)
            if target not in models:
                allowed = ", ".join(sorted(models)) or "(no models configured)"
                raise root.fail(
                    f"cascades[{i}].{key}", f"names {target!r}, which is not a model (allowed: {allowed})"
                )


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
