"""Profile session config entries reach the real onnxruntime session (read back, not timed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgert.backends.onnx import create_session, session_config
from edgert.errors import ConfigError
from edgert.profiles import ProviderSpec, load_profile, parse_profile

SPIN = "session.intra_op.allow_spinning"


def _profile(cpu: dict) -> dict:
    return {"schema": 1, "name": "x", "onnx": {"providers": [{"name": "CPUExecutionProvider", **cpu}]}}


def test_cpu_generic_turns_spinning_off_in_the_session(models_dir: Path) -> None:
    # issue 10: spinning intra-op threads burned ~15 ms CPU per MobileNetV2 request on 2 cores
    profile = load_profile("cpu-generic")
    session = create_session((models_dir / "digits_small_int8.onnx").read_bytes(), profile.providers)
    assert session.config_entry(SPIN) == "0"


def test_spinning_can_be_turned_back_on_per_profile(models_dir: Path) -> None:
    profile = parse_profile(_profile({"session_config": {SPIN: True}}), "on.toml")
    assert profile.providers[0].session_config == {SPIN: "1"}
    session = create_session((models_dir / "digits_small_int8.onnx").read_bytes(), profile.providers)
    assert session.config_entry(SPIN) == "1"


def test_no_entry_leaves_onnxruntime_default(models_dir: Path) -> None:
    profile = parse_profile(_profile({}), "plain.toml")
    session = create_session((models_dir / "digits_small_int8.onnx").read_bytes(), profile.providers)
    assert session.config_entry(SPIN) is None


def test_first_provider_that_sets_a_key_wins() -> None:
    wanted = [
        ProviderSpec("XnnpackExecutionProvider", session_config={SPIN: "1"}),
        ProviderSpec("CPUExecutionProvider", session_config={SPIN: "0", "session.x": "2"}),
    ]
    assert session_config(wanted) == {SPIN: "1", "session.x": "2"}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"allow_spinning": "0"}, "onnx.providers[0].session_config.allow_spinning: is not an onnxruntime"),
        ({SPIN: 1.5}, f"onnx.providers[0].session_config.{SPIN}: must be a string, integer or boolean"),
        ("0", "onnx.providers[0].session_config: must be a table"),
    ],
)
def test_bad_session_config_is_named(value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_profile(_profile({"session_config": value}), "bad.toml")
    assert fragment in str(err.value)
