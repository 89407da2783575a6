"""Shared helpers for the security tests (constants, a fleet publisher key and a package builder)."""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from edgert.security.keys import DeviceKeys
from edgert.security.package import VariantSource, create_package
from edgert.security.store import ModelStore
from edgert.security.trust import TrustedPublishers

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"
NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
SMALL_ONNX = MODELS / "digits_small_int8.onnx"
SMALL_TFLITE = MODELS / "digits_small_int8.tflite"
IO_DESC = ([{"name": "pixels", "dtype": "float32", "shape": [None, 64]}],
           [{"name": "logits", "dtype": "float32", "shape": [None, 10]}])
#: The test fleet's publisher key (one per test session; the stores below trust it).
PUBLISHER = ed25519.Ed25519PrivateKey.generate()


def source(model: Path, variant: str = "int8") -> VariantSource:
    """A variant source for ``model`` with the digits input/output description."""
    fmt = "tflite" if model.suffix == ".tflite" else "onnx"
    return VariantSource(model, variant, fmt, IO_DESC[0], IO_DESC[1])


def make_package(model: Path | list[VariantSource], keys: list[DeviceKeys], *, name: str = "digits",
                 version: str = "1", chunk_size: int = 4096, suite: str | None = None,
                 signer: ed25519.Ed25519PrivateKey = PUBLISHER) -> bytes:
    """An .edgepkg (bytes) of ``model`` for ``keys``, signed by ``signer``, with small chunks."""
    out = io.BytesIO()
    sources = model if isinstance(model, list) else [source(model)]
    create_package(sources, out, name=name, version=version, recipients=[k.wrap_public for k in keys],
                   signer=signer, now=NOW, chunk_size=chunk_size, suite=suite)
    return out.getvalue()


def trusted(*signers: ed25519.Ed25519PrivateKey) -> TrustedPublishers:
    """A trusted set of the given publisher keys (default: the test fleet's)."""
    from edgert.security.keys import fingerprint

    keys = {fingerprint(s.public_key()): s.public_key() for s in (signers or (PUBLISHER,))}
    return TrustedPublishers(keys, {fp: "pinned" for fp in keys})


def fleet_store(root: Path, keys: DeviceKeys, **kwargs: object) -> ModelStore:
    """A store that trusts the test fleet's publisher key."""
    return ModelStore(root, keys, trusted=trusted(), **kwargs)  # type: ignore[arg-type]
