"""LRU result cache bounded in bytes, keyed by a hash of model, version, outputs and input tensors."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["ENTRY_OVERHEAD_BYTES", "ResultCache", "cache_key"]

#: Bytes charged per entry on top of the arrays: key, dict, array headers. Keeps tiny entries honest.
ENTRY_OVERHEAD_BYTES = 256


def cache_key(
    model: str, version: str, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None
) -> bytes:
    """Hash model, version, requested outputs and every input's name, dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{model}\0{version}\0{','.join(outputs) if outputs else '*'}\0".encode())
    for name in sorted(inputs):
        array = np.ascontiguousarray(inputs[name])
        h.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        h.update(array.tobytes() if array.ndim == 0 else memoryview(array).cast("B"))  # type: ignore[arg-type]
    return h.digest()


def _entry_bytes(value: Mapping[str, np.ndarray]) -> int:
    return ENTRY_OVERHEAD_BYTES + sum(int(a.nbytes) for a in value.values())


class ResultCache:
    """Thread-safe LRU of output dicts whose total size stays at or below ``max_bytes``.

    Stored arrays are made read-only, so a caller that mutates a returned array gets an error
    instead of silently corrupting later hits.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"cache size must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, tuple[dict[str, np.ndarray], int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> dict[str, np.ndarray] | None:
        """Return the cached outputs for ``key`` (marking it most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return dict(entry[0])

    def put(self, key: bytes, value: Mapping[str, np.ndarray]) -> bool:
        """Store ``value``, evicting least recently used entries; False if it alone exceeds the bound."""
        frozen = {}
        for name, array in value.items():
            copy = np.array(array, copy=True)
            copy.flags.writeable = False
            frozen[name] = copy
        size = _entry_bytes(frozen)
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
            self._entries[key] = (frozen, size)
            self.bytes += size
        return True

    def clear(self) -> None:
        """Drop every entry (after a model swap)."""
        with self._lock:
            self._entries.clear()
            self.bytes = 0
