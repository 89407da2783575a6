"""The ``[mqtt]`` config section, validated into a frozen dataclass. Validation does no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, SyncError
from edgert.mqtt.topics import check_id

__all__ = ["DEFAULT_TELEMETRY_INTERVAL_S", "MqttConfig", "load_mqtt_config"]

DEFAULT_TELEMETRY_INTERVAL_S = 60.0
DEFAULT_SPOOL_MAX_RECORDS = 50_000
PROTOCOLS = ("5", "3.1.1")
MIN_TELEMETRY_INTERVAL_S = 0.05
MAX_TELEMETRY_INTERVAL_S = 86_400.0


@dataclass(frozen=True)
class MqttConfig:
    """Everything the sync service needs to talk to the broker; built by :meth:`from_dict`."""

    host: str
    fleet: str
    device_id: str
    port: int = 1883
    protocol: str = "5"
    client_id: str = ""
    keepalive: int = 60
    clean_session: bool = True
    username: str | None = None
    password_file: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    command_key_file: str | None = None
    group: str | None = None
    telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL_S
    spool_path: str | None = None
    spool_max_records: int = DEFAULT_SPOOL_MAX_RECORDS
    reconnect_min: float = 0.5
    reconnect_max: float = 60.0
    max_inflight: int = 100

    @property
    def tls(self) -> bool:
        """True when a CA file is configured (TLS on)."""
        return self.ca_file is not None

    @property
    def mqtt5(self) -> bool:
        """True for MQTT 5, False for 3.1.1."""
        return self.protocol == "5"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<config>") -> MqttConfig:
        """Validate a raw ``[mqtt]`` table; errors name the file, the key and the allowed values."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{source}: [mqtt] must be a table, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"{source}: unknown key(s) in [mqtt]: {', '.join(unknown)}",
                hint=f"allowed keys: {', '.join(sorted(known))}",
            )
        v = _Validator(d, source)
        tls_on = v.opt_str("ca_file") is not None
        device_id = v.ident("device_id")
        cfg = cls(
            host=v.req_str("host"),
            fleet=v.ident("fleet"),
            device_id=device_id,
            port=v.integer("port", 8883 if tls_on else 1883, 1, 65535),
            protocol=v.choice("protocol", "5", PROTOCOLS),
            client_id=v.opt_str("client_id") or f"edgert-{device_id}",
            keepalive=v.integer("keepalive", 60, 5, 65535),
            clean_session=v.boolean("clean_session", True),
            username=v.opt_str("username"),
            password_file=v.opt_str("password_file"),
            ca_file=v.opt_str("ca_file"),
            cert_file=v.opt_str("cert_file"),
            key_file=v.opt_str("key_file"),
            command_key_file=v.opt_str("command_key_file"),
            group=v.ident("group") if d.get("group") is not None else None,
            telemetry_interval=v.number(
                "telemetry_interval",
                DEFAULT_TELEMETRY_INTERVAL_S,
                MIN_TELEMETRY_INTERVAL_S,
                MAX_TELEMETRY_INTERVAL_S,
            ),
            spool_path=v.opt_str("spool_path"),
            spool_max_records=v.integer("spool_max_records", DEFAULT_SPOOL_MAX_RECORDS, 10, 10_000_000),
            reconnect_min=v.number("reconnect_min", 0.5, 0.01, 3600.0),
            reconnect_max=v.number("reconnect_max", 60.0, 0.01, 86_400.0),
            max_inflight=v.integer("max_inflight", 100, 1, 65535),
        )
        _cross_check(cfg, source)
        return cfg


def _cross_check(cfg: MqttConfig, source: str) -> None:
    if (cfg.cert_file is None) != (cfg.key_file is None):
        raise ConfigError(f"{source}: [mqtt] cert_file and key_file must be given together")
    if cfg.cert_file and not cfg.tls:
        raise ConfigError(
            f"{source}: [mqtt] cert_file/key_file need TLS", hint="set ca_file to the broker's CA certificate"
        )
    if cfg.password_file and not cfg.username:
        raise ConfigError(f"{source}: [mqtt] password_file needs username")
    if cfg.reconnect_min > cfg.reconnect_max:
        raise ConfigError(f"{source}: [mqtt] reconnect_min must be <= reconnect_max")
    if any(c in cfg.client_id for c in "+#/\0") or len(cfg.client_id) > 128:
        raise ConfigError(f"{source}: [mqtt] client_id must not contain + # / or NUL and be <= 128 chars")


class _Validator:
    """Typed getters over a raw table that raise ConfigError naming the key."""

    def __init__(self, d: Mapping[str, Any], source: str) -> None:
        self.d, self.source = d, source

    def _bad(self, key: str, expected: str) -> ConfigError:
        return ConfigError(f"{self.source}: [mqtt] {key} must be {expected}, got {self.d.get(key)!r}")

    def req_str(self, key: str) -> str:
        value = self.opt_str(key)
        if value is None:
            raise ConfigError(f"{self.source}: [mqtt] {key} is required")
        return value

    def opt_str(self, key: str) -> str | None:
        value = self.d.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self._bad(key, "a non-empty string")
        return value

    def ident(self, key: str) -> str:
        value = self.req_str(key)
        try:
            return check_id(value, key)
        except SyncError as exc:
            raise ConfigError(f"{self.source}: [mqtt] {exc.message}", hint=exc.hint) from None

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._bad(key, f"an integer in {lo}..{hi}")
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.d.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
            raise self._bad(key, f"a number in {lo}..{hi}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.d.get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value

    def choice(self, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.d.get(key, default)
        if value not in allowed:
            raise self._bad(key, "one of " + ", ".join(repr(a) for a in allowed))
        return str(value)


def load_mqtt_config(path: str | Path) -> MqttConfig:
    """Read a TOML config file and validate its ``[mqtt]`` table (the I/O adapter around from_dict)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found", hint="pass --config with an existing file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: invalid TOML: {exc}") from None
    if "mqtt" not in raw:
        raise ConfigError(f"{p}: no [mqtt] section", hint="add [mqtt] with host, fleet and device_id")
    return MqttConfig.from_dict(raw["mqtt"], str(p))
