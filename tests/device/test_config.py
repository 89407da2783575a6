"""Daemon config validation: errors name the file, the key and the allowed values."""

from __future__ import annotations

import pytest

from edgert.config import load_config, parse_config
from edgert.errors import ConfigError


def test_defaults_and_example_file_parse(repo_root):
    cfg = parse_config("", "empty.toml")
    assert cfg.http.listen == "127.0.0.1:8000" and cfg.socket.mode == 0o660 and cfg.models == ()
    example = load_config(repo_root / "packaging" / "edgert.toml")
    assert [m.name for m in example.models] == ["digits-small", "digits-large"]
    assert example.cascades[0].small == "digits-small"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[daemon]\nlog_level = 'loud'", ["f.toml", "daemon.log_level", "debug, info"]),
        ("[http]\nlisten = 'nowhere'", ["f.toml", "http.listen", "HOST:PORT"]),
        ("[http]\nlisten = '0.0.0.0:8000'", ["http.listen", "auth_token_file"]),
        ("[http]\nlistn = '127.0.0.1:1'", ["http.listn", "not a known key", "listen"]),
        ("[socket]\nmode = 'rw'", ["socket.mode", "octal"]),
        ("[[models]]\nname = 'a'\npath = '/x.onnx'", ["models[0].path", "allow_plaintext"]),
        ("[[models]]\nname = 'a'\nmax_batch_size = -1", ["models[0].max_batch_size", ">= 0"]),
        ("[[models]]\nname = 'a'\nnan_policy = 'maybe'", ["models[0].nan_policy", "allow, reject"]),
        ("[[models]]\nname = 'a'\n[[models]]\nname = 'a'", ["twice"]),
        (
            "[[models]]\nname = 'a'\n[[cascades]]\nname='c'\nsmall='a'\nlarge='b'",
            ["cascades[0].large", "'b'", "allowed: a"],
        ),
        (
            "[[cascades]]\nname='c'\nsmall='a'\nlarge='b'\nrule='vote'",
            ["cascades[0].rule", "max_softmax, margin"],
        ),
        ("[daemon]\ndrain_timeout_s = true", ["daemon.drain_timeout_s", "a number"]),
        ("not toml [", ["f.toml", "not valid TOML"]),
    ],
)
def test_errors_name_file_key_and_allowed_values(text, fragments):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.toml")
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_three_mistakes_in_three_tables_are_all_reported():
    text = "[daemon]\nlog_level = 'loud'\n[socket]\nmode = 'rw'\n[[models]]\nname = 'a'\nmax_queue = true\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.toml")
    lines = str(info.value).splitlines()
    assert lines[0] == "3 errors in f.toml:"
    keys = [ln.strip().split(": ")[1] for ln in lines[1:4]]
    assert keys == ["daemon.log_level", "socket.mode", "models[0].max_queue"]
    assert "allowed: debug, info, warning, error" in lines[1]
    problems = info.value.problems  # type: ignore[attr-defined]
    assert len(problems) == 3 and problems[2] == "f.toml: models[0].max_queue: must be an integer, got true"


def test_mqtt_table_is_parsed_once_into_frozen_settings():
    import dataclasses

    from edgert.device.sync_config import MqttSettings
    from edgert.mqtt.config import BrokerConfig

    cfg = parse_config("[mqtt]\nhost = 'b'\nfleet = 'f'\ndevice_id = 'd'\nca_file = '/ca'\n", "f.toml")
    assert isinstance(cfg.mqtt, MqttSettings) and isinstance(cfg.mqtt.broker, BrokerConfig)
    got = (cfg.mqtt.broker.port, cfg.mqtt.broker.client_id, cfg.mqtt.sync.device_id)
    assert got == (8883, "edgert-d", "d")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mqtt.broker.port = 1  # type: ignore[misc]
    assert parse_config("", "f.toml").mqtt is None
    with pytest.raises(ConfigError) as info:
        parse_config("[mqtt]\nhost = 'b'\nfleet = 'f'\nport = 'x'\n", "f.toml")
    assert "mqtt.device_id: is required" in str(info.value)
    assert "mqtt.port: must be an integer" in str(info.value)


def test_security_trusted_publishers_are_checked_and_kept(tmp_path) -> None:
    import pytest

    from edgert.config import parse_config
    from edgert.errors import ConfigError
    from edgert.security.keys import format_public_key
    from edgert.security.trust import generate_publisher_key

    pub = format_public_key(generate_publisher_key(tmp_path / "publisher.key"))
    assert pub.startswith("ed25519:")
    text = f'[security]\ntrusted_publishers = ["{pub}"]\n'
    assert parse_config(text, "t.toml").trusted_publishers == (pub,)
    wanted = r"t.toml: security.trusted_publishers\[1\]: must be an Ed25519 key"
    with pytest.raises(ConfigError, match=wanted):
        parse_config(f'[security]\ntrusted_publishers = ["{pub}", "x25519:AAAA"]\n', "t.toml")


def test_mqtt_repository_url_is_checked() -> None:
    import pytest

    from edgert.config import parse_config
    from edgert.errors import ConfigError

    base = '[mqtt]\nhost = "b"\nfleet = "f"\ndevice_id = "d"\n'
    cfg = parse_config(base + 'repository_url = "https://cdn.example/fleet/"\n', "t.toml")
    assert cfg.mqtt is not None and cfg.mqtt.sync.repository_url == "https://cdn.example/fleet/"
    with pytest.raises(ConfigError, match="repository_url: must be an http"):
        parse_config(base + 'repository_url = "ftp://x/"\n', "t.toml")
