"""Issue 9 D9: a cascade unloaded through the repository API is served again by a repository load.

Before the Deployer, `load` of a cascade name answered 404 ("not in the daemon config") because only
models were looked up. Real daemon in a thread, real HTTP and Unix-socket clients, real models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgert.client import Client
from edgert.config import parse_config
from edgert.errors import ConfigError, UnknownModelError
from tests.serve.daemon_harness import MODELS, config_text, start_daemon

pytestmark = pytest.mark.integration


def test_cascade_unload_then_load_serves_it_again(tmp_path: Path) -> None:
    running = start_daemon(parse_config(config_text(tmp_path), "cascade.toml"))
    x = np.load(MODELS / "digits_test.npz")["x"][:8]
    try:
        with Client(running.http_url) as c:
            before = c.infer("digits", {"pixels": x})["logits"]
            c.unload("digits")
            with pytest.raises(UnknownModelError):
                c.metadata("digits")
            # a member of a served cascade cannot be unloaded from under it
            c.load("digits")
            with pytest.raises(Exception, match="used by cascade"):
                c.unload("digits-small")
            assert c.metadata("digits")["versions"]
            np.testing.assert_allclose(c.infer("digits", {"pixels": x})["logits"], before, rtol=1e-6)
        with Client("unix://" + running.socket) as c:
            c.unload("digits")
            c.unload("digits-small")
            c.load("digits")  # brings the member back first, then the cascade
            assert {"digits", "digits-small", "digits-large"} <= set(c.models())
            np.testing.assert_allclose(c.infer("digits", {"pixels": x})["logits"], before, rtol=1e-6)
    finally:
        running.stop()


def test_config_error_type_is_kept(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        parse_config(config_text(tmp_path).replace('small = "digits-small"', 'small = "nope"'), "bad.toml")
