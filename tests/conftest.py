"""Project-wide fixtures: paths to the committed sample models and a real CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"

# Tests that import onnxruntime themselves do it as edgert does (edgert/backends/onnx.py): without
# onnxruntime's telemetry client (a thread, a cache under ~/.cache, uploads). Tests of that default
# remove the variable from their subprocesses' environment.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def models_dir() -> Path:
    """The committed sample models."""
    return MODELS


def run_edgert(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``edgert`` CLI in a subprocess (as a user would) and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edgert.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=str(REPO),
        input=input.decode() if input is not None else None,
    )


@pytest.fixture(scope="session")
def edgert_cli():
    """The :func:`run_edgert` helper as a fixture."""
    return run_edgert
