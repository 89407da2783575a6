"""Fixtures for engine tests: real sample models from models/, a runtime and test data."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgert import Runtime
from edgert.engine import Engine
from edgert.metrics import Metrics

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="session")
def runtime() -> Runtime:
    return Runtime("cpu-generic")


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(MODELS / "digits_test.npz")
    return data["x"], data["y"]


@pytest.fixture
def load(runtime: Runtime) -> Any:
    def _load(file: str, version: str = "1", name: str | None = None) -> Any:
        return runtime.load(MODELS / file, name=name, version=version)

    return _load


@pytest.fixture
def engine() -> Iterator[Engine]:
    eng = Engine(Metrics())
    yield eng
    eng.close()


class Instrumented:
    """A real model with a test gate in front of ``run`` and a count of ``close`` calls.

    ``gate`` blocks runs until set (to hold requests in flight deterministically); ``fail`` makes
    runs raise (to simulate a session that breaks during warm-up).
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.closed = 0
        self.runs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    @property
    def provider(self) -> str:
        return self._model.provider

    def run(self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict:
        self.gate.wait()
        self.runs += 1
        if self.fail:
            raise RuntimeError("simulated session failure")
        return self._model.run(inputs, outputs)

    def close(self) -> None:
        self.closed += 1
        self._model.close()


def aio(fn: Any) -> Any:
    """Run an async test function in a fresh event loop (no pytest plugin needed)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
