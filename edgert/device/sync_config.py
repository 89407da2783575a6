"""The daemon's ``[mqtt]`` table, parsed once: broker connection plus device sync settings.

The TOML is one flat ``[mqtt]`` table (unchanged); it is split into the broker part
(:class:`~edgert.mqtt.config.BrokerConfig`, which the MQTT link takes) and the device part
(:class:`SyncConfig`), composed as :class:`MqttSettings`. Validation does no I/O; only
:func:`load_mqtt_settings` reads a file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgert.errors import ConfigError, SyncError
from edgert.mqtt.config import (
    DEFAULT_TELEMETRY_INTERVAL_S,
    MAX_TELEMETRY_INTERVAL_S,
    MIN_TELEMETRY_INTERVAL_S,
    BrokerConfig,
    parse_broker,
)
from edgert.mqtt.topics import check_id
from edgert.tomlschema import Problems, Table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 images
    import tomli as tomllib

__all__ = ["MqttSettings", "SyncConfig", "load_mqtt_settings", "parse_mqtt"]

DEFAULT_SPOOL_MAX_RECORDS = 50_000
MQTT_HINT = "see docs/mqtt.md for the [mqtt] keys"


@dataclass(frozen=True)
class SyncConfig:
    """Who this device is in the fleet and how it spools and reports (the non-broker [mqtt] keys)."""

    fleet: str
    device_id: str
    group: str | None = None
    command_key_file: str | None = None  # the pinned fleet command public key; None = commands off
    telemetry_interval: float = DEFAULT_TELEMETRY_INTERVAL_S
    spool_path: str | None = None  # None = the spool in the state dir
    spool_max_records: int = DEFAULT_SPOOL_MAX_RECORDS
    #: Fetch TUF metadata and packages from this static HTTP(S) repository (a CDN or bucket holding the
    #: fleet's ``repository/`` directory) instead of over MQTT; None = over MQTT (the default).
    repository_url: str | None = None


@dataclass(frozen=True)
class MqttSettings:
    """The parsed ``[mqtt]`` table: broker connection and device sync settings."""

    broker: BrokerConfig
    sync: SyncConfig

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<config>") -> MqttSettings:
        """Validate a raw flat ``[mqtt]`` table; raises one ConfigError listing every problem."""
        problems = Problems(source, hint=MQTT_HINT)
        settings = parse_mqtt(problems.table(dict(d) if isinstance(d, Mapping) else d, "mqtt"))
        problems.raise_if_any()
        return settings

    def public(self) -> dict[str, Any]:
        """A flat view without anything secret (paths are fine; no file is read here)."""
        flat = {**asdict(self.broker), **asdict(self.sync)}
        flat.pop("username", None)
        return flat


def _ident(table: Table, key: str) -> str:
    value = table.string(key, required=True, nonempty=True)
    if not value:
        return value
    try:
        return check_id(value, key)
    except SyncError as exc:
        table.fail(key, exc.message)
        return value


def _repository_url(table: Table) -> str | None:
    url = table.optional_string("repository_url")
    if url is not None and not (url.startswith(("https://", "http://")) and url.endswith("/")):
        table.fail("repository_url", f"must be an http(s):// URL ending in '/', got {url!r}")
        return None
    return url


def parse_mqtt(table: Table) -> MqttSettings:
    """Read a flat ``[mqtt]`` table into :class:`MqttSettings`, recording every problem in it."""
    device_id = _ident(table, "device_id")
    sync = SyncConfig(
        fleet=_ident(table, "fleet"),
        device_id=device_id,
        group=_ident(table, "group") if table.has("group") else None,
        command_key_file=table.optional_string("command_key_file"),
        telemetry_interval=table.number(
            "telemetry_interval",
            DEFAULT_TELEMETRY_INTERVAL_S,
            minimum=MIN_TELEMETRY_INTERVAL_S,
            maximum=MAX_TELEMETRY_INTERVAL_S,
        ),
        spool_path=table.optional_string("spool_path"),
        spool_max_records=table.integer(
            "spool_max_records", DEFAULT_SPOOL_MAX_RECORDS, minimum=10, maximum=10_000_000
        ),
        repository_url=_repository_url(table),
    )
    broker = parse_broker(table, default_client_id=f"edgert-{device_id}")
    table.check_unknown()
    return MqttSettings(broker=broker, sync=sync)


def load_mqtt_settings(path: str | os.PathLike[str]) -> MqttSettings:
    """Read a TOML config file and validate its ``[mqtt]`` table (the I/O adapter around parse_mqtt)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found", hint="pass --config with an existing file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}", hint="check quoting and brackets") from None
    if "mqtt" not in raw:
        raise ConfigError(f"{p}: no [mqtt] section", hint="add [mqtt] with host, fleet and device_id")
    return MqttSettings.from_dict(raw["mqtt"], str(p))
