"""`[daemon] log_level` sets the daemon's log level; `-v` on the command line can only ask for more."""

from __future__ import annotations

import logging

import pytest

from edgert.cli.daemon import _log_level
from edgert.config import parse_config
from edgert.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("edgert.logs._explicit_level", None)  # restored after the test
    logger = logging.getLogger("edgert")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.mark.parametrize("wanted", ["debug", "info", "warning", "error"])
def test_the_configured_level_holds_without_verbose(wanted: str) -> None:
    configure_logging(logging.WARNING)  # what `edgert` does with no -v
    _log_level(parse_config(f"[daemon]\nlog_level = '{wanted}'\n"))
    assert logging.getLogger("edgert").level == getattr(logging, wanted.upper())


def test_verbose_on_the_command_line_is_never_made_quieter() -> None:
    configure_logging(logging.DEBUG, explicit=True)  # `edgert -vv daemon`
    _log_level(parse_config("[daemon]\nlog_level = 'error'\n"))
    assert logging.getLogger("edgert").level == logging.DEBUG
