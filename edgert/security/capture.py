"""Sealed data capture: sampled inputs/outputs encrypted to the *fleet's* public key.

Each sampled request becomes one frame: a fresh record key wrapped to the fleet X25519 key (same
suites as packages) and the record (JSON metadata + ``.npz`` tensors) under AES-256-GCM with that
key. The device forgets the record key after writing, so it cannot read its own captures; only
the holder of the fleet private key can (``edgert capture open``).

File: ``b"EDGECAP1"`` then frames ``u32 header_len | header JSON | u32 ct_len | ct``.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edgert.errors import ConfigError, IntegrityError
from edgert.security import envelope
from edgert.security.atomic import FileSystem, ensure_private_dir
from edgert.security.keys import format_public_key, parse_public_key
from edgert.security.package import canonical_json, check_name

__all__ = ["CaptureRecord", "CaptureSettings", "CaptureWriter", "generate_fleet_key", "load_capture_config",
           "open_capture", "save_capture_config"]

MAGIC = b"EDGECAP1"
CONFIG_FILE = "config.json"
#: Start a new capture file after this many bytes.
FILE_BYTES = 8 << 20
MAX_FRAME = 64 << 20
_INFO = b"edgert-capture-v1\0"


@dataclass(frozen=True)
class CaptureSettings:
    """Per-model capture policy: sampling rate in [0, 1], size cap, fleet public key text."""

    rate: float
    max_bytes: int
    fleet_public_key: str

    def validate(self, model: str) -> CaptureSettings:
        """Check ranges (ConfigError naming the model and the field)."""
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"capture rate for {model} must be between 0 and 1, got {self.rate}")
        if self.max_bytes <= 0:
            raise ConfigError(f"capture size cap for {model} must be positive, got {self.max_bytes}")
        parse_public_key(self.fleet_public_key)
        return self


def load_capture_config(directory: Path) -> dict[str, CaptureSettings]:
    """Capture settings per model from ``<capture dir>/config.json`` (empty if absent)."""
    path = Path(directory) / CONFIG_FILE
    try:
        doc = json.loads(path.read_bytes())
        return {m: CaptureSettings(float(s["rate"]), int(s["max_bytes"]),
                                   str(s["fleet_public_key"])).validate(m) for m, s in doc.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"capture config {path} is invalid: {exc}",
                          hint="re-create it with 'edgert capture enable'") from exc


def save_capture_config(directory: Path, config: Mapping[str, CaptureSettings]) -> None:
    """Write capture settings atomically."""
    ensure_private_dir(Path(directory))
    doc = {m: {"rate": s.rate, "max_bytes": s.max_bytes, "fleet_public_key": s.fleet_public_key}
           for m, s in config.items()}
    FileSystem().atomic_write(Path(directory) / CONFIG_FILE, [json.dumps(doc, indent=1).encode()], step="cfg")


def generate_fleet_key(path: Path) -> str:
    """Create the fleet's capture key pair (private PEM at ``path``, 0600); return the public key text."""
    from edgert.security.keys import _pem

    if Path(path).exists():
        raise ConfigError(f"{path} already exists", hint="choose another path; never overwrite a fleet key")
    ensure_private_dir(Path(path).parent)
    key = x25519.X25519PrivateKey.generate()
    FileSystem().atomic_write(Path(path), [_pem(key)], mode=0o600, step="fleet-key")
    return format_public_key(key.public_key())


def _npz(prefix: str, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}/{k}": np.asarray(v) for k, v in tensors.items()}


class CaptureWriter:
    """Per-model sampler and sealed writer; :meth:`maybe_capture` is cheap when it skips."""

    def __init__(self, directory: Path, model: str, fleet_public: x25519.X25519PublicKey, *, rate: float,
                 max_bytes: int, rng: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time, file_bytes: int = FILE_BYTES) -> None:
        self.directory = ensure_private_dir(Path(directory) / check_name(model))
        self.model = model
        self.fleet_public = fleet_public
        self.rate = rate
        self.max_bytes = max_bytes
        self.rng = rng
        self.clock = clock
        self.file_bytes = file_bytes
        self.captured = 0
        self.dropped_full = 0
        self._lock = threading.Lock()
        self._used = sum(p.stat().st_size for p in self.directory.glob("*.sealed"))
        self._file: io.BufferedWriter | None = None
        self._file_size = 0

    @classmethod
    def from_settings(cls, directory: Path, model: str, settings: CaptureSettings) -> CaptureWriter:
        """A writer from stored settings."""
        return cls(directory, model, parse_public_key(settings.fleet_public_key), rate=settings.rate,
                   max_bytes=settings.max_bytes)

    def maybe_capture(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                      **meta: Any) -> bool:
        """Sample this request; if chosen and under the cap, seal and append it. True if written."""
        return self.sample() and self.write(inputs, outputs, **meta)

    def sample(self) -> bool:
        """The cheap request-path half: one random draw (nothing when disabled or full)."""
        return self.rate > 0.0 and self._used < self.max_bytes and self.rng() < self.rate

    def write(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], **meta: Any) -> bool:
        """Seal and append one record (the slow half, run off the request path); False when over the cap."""
        frame = self._seal(inputs, outputs, meta)
        with self._lock:
            if self._used + len(frame) > self.max_bytes:
                self.dropped_full += 1
                return False
            self._append(frame)
            self.captured += 1
        return True

    def _seal(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
              meta: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        arrays: dict[str, Any] = {**_npz("in", inputs), **_npz("out", outputs)}
        np.savez(buf, **arrays)
        head = canonical_json({"model": self.model, "ts": repr(self.clock()),
                               **{k: str(v) for k, v in meta.items()}})
        plaintext = struct.pack(">I", len(head)) + head + buf.getvalue()
        key = envelope.new_key()
        context = _INFO + self.model.encode()
        wrapped = canonical_json(envelope.wrap_key(key, self.fleet_public, context))
        ct = AESGCM(key).encrypt(b"\0" * 12, plaintext, wrapped)  # one-time key: a fixed nonce is safe
        return struct.pack(">I", len(wrapped)) + wrapped + struct.pack(">I", len(ct)) + ct

    def _append(self, frame: bytes) -> None:
        if self._file is None or self._file_size >= self.file_bytes:
            self.close()
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
            path = self.directory / f"cap-{stamp}-{os.getpid()}.sealed"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._file = os.fdopen(fd, "wb")
            self._file.write(MAGIC)
            self._file_size = len(MAGIC)
            self._used += len(MAGIC)
        self._file.write(frame)
        self._file.flush()
        self._file_size += len(frame)
        self._used += len(frame)

    def close(self) -> None:
        """Close the current capture file."""
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass(frozen=True)
class CaptureRecord:
    """One opened capture: metadata, input and output tensors."""

    meta: dict[str, Any]
    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]


def _open_frame(wrapped: bytes, ct: bytes, private: x25519.X25519PrivateKey, model: str) -> CaptureRecord:
    try:
        record = json.loads(wrapped)
        if not isinstance(record, dict):
            raise ValueError("not an object")
        key = envelope.unwrap_key(record, private, _INFO + model.encode())
        plaintext = AESGCM(key).decrypt(b"\0" * 12, ct, wrapped)
    except (ValueError, InvalidTag):
        raise IntegrityError(envelope.INTEGRITY_MESSAGE) from None
    (hlen,) = struct.unpack(">I", plaintext[:4])
    meta = json.loads(plaintext[4: 4 + hlen])
    arrays = np.load(io.BytesIO(plaintext[4 + hlen:]), allow_pickle=False)
    inputs = {k[3:]: arrays[k] for k in arrays.files if k.startswith("in/")}
    outputs = {k[4:]: arrays[k] for k in arrays.files if k.startswith("out/")}
    return CaptureRecord(meta, inputs, outputs)


def open_capture(path: Path, private: x25519.X25519PrivateKey,
                 model: str | None = None) -> Iterator[CaptureRecord]:
    """Decrypt every record of a capture file with the fleet private key (model: its directory name)."""
    path = Path(path)
    model = model or path.parent.name
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise IntegrityError(envelope.INTEGRITY_MESSAGE)
        while True:
            head = f.read(4)
            if not head:
                return
            wrapped = _read_sized(f, head)
            ct = _read_sized(f, f.read(4))
            yield _open_frame(wrapped, ct, private, model)


def _read_sized(f: io.BufferedReader, head: bytes) -> bytes:
    if len(head) != 4:
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)
    (n,) = struct.unpack(">I", head)
    data = f.read(n) if n <= MAX_FRAME else b""
    if len(data) != n or n == 0:
        raise IntegrityError(envelope.INTEGRITY_MESSAGE)
    return data
