"""Plaintext buffers for decrypted models: one uninitialised ``bytes`` object, filled in place, wipeable.

Both backends want an immutable ``bytes`` (onnxruntime's Python API checks for it; LiteRT reads
the flatbuffer in place from it). Decrypting into a ``bytearray`` and then calling ``bytes()``
costs a zero-fill, a second full plaintext copy and a wipe of the first. On CPython we instead
allocate the ``bytes`` object uninitialised (``PyBytes_FromStringAndSize(NULL, n)``, as C
extensions do), expose its storage as a writable view, decrypt straight into it, and drop the
view before anyone else sees the object. Nobody can observe the object while it is being filled:
it has no other references and its hash has not been computed. Elsewhere (PyPy) we fall back to a
``bytearray`` and one copy.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["PlaintextBuffer", "wipe"]

_CPYTHON = sys.implementation.name == "cpython"
#: Offset of ``ob_sval`` in a CPython bytes object (basic size counts the trailing NUL).
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1


# One prototype for the process (setting restype/argtypes on every call cost ~10 µs per model load).
_MAKE_BYTES = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi)) if _CPYTHON else None


def _uninitialised_bytes(size: int) -> bytes:
    assert _MAKE_BYTES is not None
    obj: bytes = _MAKE_BYTES(None, size)
    return obj


def _writable_view(obj: bytes) -> memoryview:
    """A writable view of a CPython bytes object's storage (the caller keeps ``obj`` alive)."""
    array = (ctypes.c_char * len(obj)).from_address(id(obj) + _BYTES_DATA_OFFSET)
    return memoryview(array).cast("B")


class PlaintextBuffer:
    """``size`` bytes to decrypt into (:attr:`view`), then handed out once as ``bytes`` (:meth:`take`)."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self._bytes: bytes | None = None
        self._array: bytearray | None = None
        if _CPYTHON and size > 1:  # 0 and 1 byte objects may be shared singletons: never write into them
            self._bytes = _uninitialised_bytes(size)
            self.view = _writable_view(self._bytes)
        else:
            self._array = bytearray(size)
            self.view = memoryview(self._array)

    def take(self) -> bytes:
        """Release the writable view and return the filled plaintext as ``bytes`` (one copy off CPython)."""
        self.view.release()
        if self._bytes is not None:
            out, self._bytes = self._bytes, None
            return out
        assert self._array is not None
        out = bytes(self._array)
        wipe(self._array)
        self._array = None
        return out

    def discard(self) -> None:
        """Wipe and drop the buffer (after a failed decryption)."""
        self.view.release()
        if self._bytes is not None:
            wipe(self._bytes)
            self._bytes = None
        elif self._array is not None:
            wipe(self._array)
            self._array = None


def wipe(data: bytes | bytearray) -> None:
    """Overwrite ``data`` with zeros in place (best effort: only do this to objects nobody else uses).

    Writing into a ``bytes`` object is only safe when no one else holds a reference to it (compare
    ``sys.getrefcount`` against a baseline); LiteRT, for example, reads its model in place.
    """
    n = len(data)
    if n == 0:
        return
    if isinstance(data, bytearray):
        ctypes.memset((ctypes.c_char * n).from_buffer(data), 0, n)
    elif _CPYTHON and n > 1:
        ctypes.memset(id(data) + _BYTES_DATA_OFFSET, 0, n)
