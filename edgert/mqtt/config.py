"""Broker connection settings, validated into a frozen :class:`BrokerConfig`. Validation does no I/O.

Only what the MQTT link needs lives here (address, protocol, TLS, credentials, reconnects); device
sync settings (fleet, device id, spool, telemetry) live in :mod:`edgert.device.sync_config`, so the
fleet side can reuse this class. The TOML stays one flat ``[mqtt]`` table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgert.tomlschema import Problems, Table

__all__ = [
    "BROKER_KEYS",
    "DEFAULT_TELEMETRY_INTERVAL_S",
    "MAX_TELEMETRY_INTERVAL_S",
    "MIN_TELEMETRY_INTERVAL_S",
    "PROTOCOLS",
    "BrokerConfig",
    "parse_broker",
]

DEFAULT_TELEMETRY_INTERVAL_S = 60.0
MIN_TELEMETRY_INTERVAL_S = 0.05
MAX_TELEMETRY_INTERVAL_S = 86_400.0
PROTOCOLS = ("5", "3.1.1")
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
MAX_CLIENT_ID_CHARS = 128
#: The keys of the flat ``[mqtt]`` table that belong to the broker connection.
BROKER_KEYS = (
    "host", "port", "protocol", "client_id", "keepalive", "clean_session", "ca_file", "cert_file",
    "key_file", "username", "password_file", "reconnect_min", "reconnect_max", "max_inflight",
)


@dataclass(frozen=True)
class BrokerConfig:
    """How to reach and authenticate to one MQTT broker; built by :func:`parse_broker`."""

    host: str
    client_id: str
    port: int = DEFAULT_PORT
    protocol: str = "5"
    keepalive: int = 60
    clean_session: bool = True
    ca_file: str | None = None  # set = TLS on
    cert_file: str | None = None
    key_file: str | None = None
    username: str | None = None
    password_file: str | None = None
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
    def from_dict(
        cls,
        d: Mapping[str, Any],
        source: str = "<config>",
        *,
        prefix: str = "mqtt",
        default_client_id: str = "",
    ) -> BrokerConfig:
        """Validate a raw table holding only broker keys; raises one ConfigError listing every problem."""
        problems = Problems(source)
        table = problems.table(dict(d) if isinstance(d, Mapping) else d, prefix)
        cfg = parse_broker(table, default_client_id=default_client_id)
        table.check_unknown()
        problems.raise_if_any()
        return cfg


def parse_broker(table: Table, *, default_client_id: str) -> BrokerConfig:
    """Read the broker keys of ``table`` (recording problems in it; unknown keys are the caller's)."""
    ca_file = table.optional_string("ca_file")
    cfg = BrokerConfig(
        host=table.string("host", required=True, nonempty=True),
        port=table.integer("port", DEFAULT_TLS_PORT if ca_file else DEFAULT_PORT, minimum=1, maximum=65535),
        protocol=table.choice("protocol", "5", PROTOCOLS),
        client_id=table.optional_string("client_id") or default_client_id,
        keepalive=table.integer("keepalive", 60, minimum=5, maximum=65535),
        clean_session=table.boolean("clean_session", True),
        ca_file=ca_file,
        cert_file=table.optional_string("cert_file"),
        key_file=table.optional_string("key_file"),
        username=table.optional_string("username"),
        password_file=table.optional_string("password_file"),
        reconnect_min=table.number("reconnect_min", 0.5, minimum=0.01, maximum=3600.0),
        reconnect_max=table.number("reconnect_max", 60.0, minimum=0.01, maximum=86_400.0),
        max_inflight=table.integer("max_inflight", 100, minimum=1, maximum=65535),
    )
    _cross_check(cfg, table)
    return cfg


def _cross_check(cfg: BrokerConfig, table: Table) -> None:
    if (cfg.cert_file is None) != (cfg.key_file is None):
        table.fail("cert_file", "cert_file and key_file must be given together")
    elif cfg.cert_file and not cfg.tls:
        table.fail("cert_file", "cert_file/key_file need TLS: set ca_file to the broker's CA certificate")
    if cfg.password_file and not cfg.username:
        table.fail("password_file", "password_file needs username")
    if cfg.reconnect_min > cfg.reconnect_max:
        table.fail(
            "reconnect_min", f"must be <= reconnect_max ({cfg.reconnect_max:g}), got {cfg.reconnect_min:g}"
        )
    if any(c in cfg.client_id for c in "+#/\0") or len(cfg.client_id) > MAX_CLIENT_ID_CHARS:
        table.fail("client_id", f"must not contain + # / or NUL and be <= {MAX_CLIENT_ID_CHARS} chars")
