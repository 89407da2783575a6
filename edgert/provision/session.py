"""The provisioning session: a pure request/answer state machine and a thin pyserial adapter.

The technician's side (:class:`HostSession`) sends HELLO, REQUEST and DATA frames, each with a new
sequence number, and waits for the ACK or ERROR with the same number. A NAK (the device saw a
damaged frame) or a timeout makes it send the same frame again, ``attempts`` times in all; the
device (:class:`DeviceSession`) keeps its last answer and repeats it for a repeated request, so a
lost answer never runs an operation twice. Timeouts scale with the frame size at the line rate.

Pure parts (:class:`Exchange`, :class:`DeviceSession`) take bytes and return bytes; the port is
anything with ``write(bytes)`` and ``read(n)`` honouring a ``timeout`` attribute (a pyserial
``Serial``), opened by :func:`open_port` from any pyserial URL (``/dev/ttyUSB0``, a pty,
``loop://``, ``socket://host:port``).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import hashlib
import json
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from edgert.errors import EdgertError, ProvisionError
from edgert.provision.frames import MAX_PAYLOAD, PROTOCOL_VERSION, Frame, FrameDecoder, MsgType, encode_frame

__all__ = [
    "ACK_TIMEOUT_S",
    "ATTEMPTS",
    "CHUNK_SIZE",
    "DEFAULT_BAUD",
    "OP_TIMEOUTS_S",
    "DeviceRefusal",
    "DeviceSession",
    "ErrorCode",
    "Exchange",
    "HostSession",
    "NoAnswerError",
    "RemoteError",
    "open_port",
    "read_available",
    "timeout_for",
]

DEFAULT_BAUD = 115200
#: Bits per byte on the line (8N1: start + 8 data + stop).
BITS_PER_BYTE = 10
#: Wait for an answer at least this long, plus the frame's time on the wire times TIMEOUT_MARGIN.
ACK_TIMEOUT_S = 1.0
TIMEOUT_MARGIN = 3.0
#: Sends of one frame before giving up (the first send included).
ATTEMPTS = 6
#: Transfer chunk size: large enough that the answer's round trip costs < 1% of line time.
CHUNK_SIZE = 4096
#: Extra time the device may take to carry out an operation (model load, key generation, broker).
OP_TIMEOUTS_S: dict[str, float] = {
    "keys": 20.0,
    "configure": 10.0,
    "enroll": 45.0,
    "selftest": 60.0,
    "install_begin": 10.0,
    "install_commit": 120.0,
    "finish": 10.0,
}
log = logging.getLogger("edgert.provision")
READ_BLOCK = 65536
PORTS_HINT = "'edgert provision ports' lists the ports present"
_OFFSET = struct.Struct(">Q")


class ErrorCode(enum.IntEnum):
    """Codes of ERROR messages; :data:`ERROR_TEXT` says what each means to a technician."""

    VERSION = 1
    UNKNOWN_OP = 2
    BAD_ARGS = 3
    LOCKED = 4
    OUT_OF_ORDER = 5
    CONFIG = 6
    SECURITY = 7
    TRANSFER = 8
    ENROLL = 9
    INTERNAL = 10
    STORE = 11


ERROR_TEXT: dict[int, str] = {
    ErrorCode.VERSION: "protocol version mismatch",
    ErrorCode.UNKNOWN_OP: "the device does not know this operation",
    ErrorCode.BAD_ARGS: "malformed request",
    ErrorCode.LOCKED: "the device is already provisioned",
    ErrorCode.OUT_OF_ORDER: "a previous step is missing",
    ErrorCode.CONFIG: "the configuration was refused",
    ErrorCode.SECURITY: "a key, certificate or signature was refused",
    ErrorCode.TRANSFER: "the transfer is incomplete or does not match",
    ErrorCode.ENROLL: "enrollment with the fleet failed",
    ErrorCode.INTERNAL: "internal error on the device (see its journal)",
    ErrorCode.STORE: "the model store refused the package",
}


class RemoteError(ProvisionError):
    """The device answered a request with an ERROR message."""

    def __init__(self, code: int, message: str, *, hint: str | None = None) -> None:
        text = ERROR_TEXT.get(code, f"error code {code}")
        super().__init__(f"device: {text}: {message}", hint=hint)
        self.code = code


class NoAnswerError(ProvisionError):
    """No valid answer after every attempt."""


class DeviceRefusal(ProvisionError):
    """Raised by a device-side handler to answer with a specific :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def timeout_for(nbytes: int, baud: int = DEFAULT_BAUD, base: float = ACK_TIMEOUT_S) -> float:
    """Seconds to wait for the answer to a frame of ``nbytes``: base plus wire time, with margin."""
    return base + TIMEOUT_MARGIN * (nbytes + 64) * BITS_PER_BYTE / baud


class Exchange:
    """One request in flight (pure): what to send, and what to do with each frame or timeout."""

    def __init__(self, wire: bytes, seq: int, *, timeout: float, attempts: int = ATTEMPTS) -> None:
        self.wire, self.seq, self.timeout = wire, seq, timeout
        self.attempts_left = attempts
        self.deadline = 0.0
        self.sends = 0

    def send(self, now: float) -> bytes:
        """The frame to (re)send now; NoAnswerError when no attempts are left."""
        if self.attempts_left <= 0:
            raise NoAnswerError(
                f"no answer from device after {self.sends} attempts",
                hint=f"is the provisioning agent running? check baud rate {DEFAULT_BAUD} and the cable",
            )
        self.attempts_left -= 1
        self.sends += 1
        self.deadline = now + self.timeout
        return self.wire

    def on_frame(self, frame: Frame, now: float) -> tuple[bool, Any, bytes | None]:
        """(done, result, bytes to send). Raises RemoteError for an ERROR answer to this request."""
        if frame.type == MsgType.NAK:
            return False, None, self.send(now)
        if frame.seq != self.seq:
            return False, None, None  # a late answer to an earlier request
        if frame.type == MsgType.ACK:
            return True, _json(frame.payload), None
        if frame.type == MsgType.ERROR:
            doc = _json(frame.payload)
            raise RemoteError(int(doc.get("code", 0)), str(doc.get("message", "")), hint=doc.get("hint"))
        return False, None, None


def _json(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload) if payload else {}
    except (ValueError, UnicodeDecodeError):
        raise ProvisionError("the answer is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ProvisionError("the answer is not a JSON object")
    return doc


class Port(Protocol):
    """What the session needs of a serial port (pyserial's ``Serial`` has it)."""

    timeout: float | None

    def write(self, data: bytes) -> int | None: ...

    def read(self, size: int = 1) -> bytes: ...

    @property
    def in_waiting(self) -> int: ...


Progress = Callable[[int, int], None]


def read_available(port: Port) -> bytes:
    """Wait up to ``port.timeout`` for one byte, then take whatever else has arrived, without waiting.

    (pyserial's ``read(n)`` waits for all ``n`` bytes or the timeout: a short answer would cost the
    whole timeout on every chunk.)
    """
    first = port.read(1)
    if not first:
        return b""
    waiting = int(getattr(port, "in_waiting", 0) or 0)
    return first + port.read(min(waiting, READ_BLOCK)) if waiting else first


class HostSession:
    """The technician's side of a session over an open port."""

    def __init__(
        self,
        port: Port,
        *,
        baud: int = DEFAULT_BAUD,
        attempts: int = ATTEMPTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port, self.baud, self.attempts, self.clock = port, baud, attempts, clock
        self.decoder = FrameDecoder()
        self.seq = 0
        self.version: int | None = None
        self.max_payload = MAX_PAYLOAD
        self.resends = 0

    def _next_seq(self) -> int:
        self.seq = self.seq % 0xFFFF + 1
        return self.seq

    def _exchange(self, msg_type: MsgType, payload: bytes, extra_timeout: float = 0.0) -> dict[str, Any]:
        seq = self._next_seq()
        wire = encode_frame(msg_type, seq, payload)
        ex = Exchange(
            wire, seq, timeout=timeout_for(len(wire), self.baud) + extra_timeout, attempts=self.attempts
        )
        self._write(ex.send(self.clock()))
        while True:
            now = self.clock()
            if now >= ex.deadline:
                self.resends += 1
                self._write(ex.send(now))
                continue
            self.port.timeout = min(0.05, max(0.001, ex.deadline - now))
            data = read_available(self.port)
            for frame in self.decoder.feed(data) if data else []:
                done, result, resend = ex.on_frame(frame, self.clock())
                if resend is not None:
                    self.resends += 1
                    self._write(resend)
                if done:
                    return dict(result)

    def _write(self, data: bytes) -> None:
        self.port.write(data)

    def hello(self, versions: tuple[int, ...] = (PROTOCOL_VERSION,)) -> dict[str, Any]:
        """Negotiate the protocol version; RemoteError(VERSION) when there is no common one."""
        payload = json.dumps({"versions": list(versions), "max_payload": MAX_PAYLOAD}).encode()
        answer = self._exchange(MsgType.HELLO, payload)
        self.version = int(answer.get("version", 0))
        self.max_payload = min(MAX_PAYLOAD, int(answer.get("max_payload", MAX_PAYLOAD)))
        return answer

    def request(self, op: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Run one operation on the device and return its JSON answer."""
        payload = json.dumps({"op": op, "args": dict(args or {})}, separators=(",", ":")).encode()
        return self._exchange(MsgType.REQUEST, payload, OP_TIMEOUTS_S.get(op, 0.0))

    def send_file(
        self, name: str, data: bytes, *, progress: Progress | None = None, chunk: int = CHUNK_SIZE
    ) -> dict[str, Any]:
        """Push ``data`` in chunks, resuming where the device already has it; install_begin's answer."""
        digest = hashlib.sha256(data).hexdigest()
        begin = self.request("install_begin", {"name": name, "size": len(data), "sha256": digest})
        offset = int(begin.get("offset", 0))
        chunk = max(1, min(chunk, self.max_payload - _OFFSET.size))
        if progress:
            progress(offset, len(data))
        while offset < len(data):
            piece = data[offset : offset + chunk]
            answer = self._exchange(MsgType.DATA, _OFFSET.pack(offset) + piece)
            offset = int(answer.get("next", offset + len(piece)))
            if progress:
                progress(offset, len(data))
        return begin


Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
DataHandler = Callable[[int, bytes], dict[str, Any]]


class DeviceSession:
    """The device's side (pure): bytes in, bytes out; operations run through the handlers given."""

    def __init__(
        self,
        on_request: Handler,
        on_data: DataHandler,
        *,
        versions: tuple[int, ...] = (PROTOCOL_VERSION,),
        hello_info: Mapping[str, Any] | None = None,
        max_payload: int = MAX_PAYLOAD,
    ) -> None:
        self.on_request, self.on_data = on_request, on_data
        self.versions = versions
        self.hello_info = dict(hello_info or {})
        self.decoder = FrameDecoder(max_payload)
        self.max_payload = max_payload
        self._last: tuple[int, int, bytes] | None = None  # (seq, type, sha256 of payload)
        self._last_answer = b""
        self.version: int | None = None

    def receive(self, data: bytes) -> bytes:
        """Consume bytes from the line; return the bytes to write back (answers and NAKs)."""
        damaged = self.decoder.damaged
        out = []
        for frame in self.decoder.feed(data):
            out.append(self._answer(frame))
        if self.decoder.damaged > damaged:
            out.append(encode_frame(MsgType.NAK, 0))
        return b"".join(out)

    def _answer(self, frame: Frame) -> bytes:
        key = (frame.seq, frame.type, hashlib.sha256(frame.payload).digest())
        if key == self._last:
            return self._last_answer  # the requester lost our answer: repeat it, do not redo the work
        if frame.type not in (MsgType.HELLO, MsgType.REQUEST, MsgType.DATA):
            return b""
        try:
            result = self._dispatch(frame)
            answer = encode_frame(
                MsgType.ACK,
                frame.seq,
                json.dumps(result, separators=(",", ":")).encode(),
                max_payload=self.max_payload,
            )
        except DeviceRefusal as exc:
            answer = _error(frame.seq, exc.code, exc.message, exc.hint)
        except EdgertError as exc:
            answer = _error(frame.seq, _code_for(exc), exc.message, exc.hint)
        except Exception as exc:  # never let one request kill the agent; no details that could leak
            log.exception("provisioning request failed")
            answer = _error(frame.seq, ErrorCode.INTERNAL, type(exc).__name__, None)
        self._last, self._last_answer = key, answer
        return answer

    def _dispatch(self, frame: Frame) -> dict[str, Any]:
        if frame.type == MsgType.HELLO:
            return self._hello(frame)
        if self.version is None or frame.version != self.version:
            raise DeviceRefusal(
                ErrorCode.VERSION,
                f"frame version {frame.version}; send HELLO first",
                hint="upgrade edgert so both sides speak the same protocol version",
            )
        if frame.type == MsgType.DATA:
            if len(frame.payload) < _OFFSET.size:
                raise DeviceRefusal(ErrorCode.BAD_ARGS, "DATA frame without an offset")
            (offset,) = _OFFSET.unpack_from(frame.payload)
            return self.on_data(offset, frame.payload[_OFFSET.size :])
        doc = _json(frame.payload)
        op, args = doc.get("op"), doc.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            raise DeviceRefusal(ErrorCode.BAD_ARGS, "a request needs a string 'op' and an object 'args'")
        return self.on_request(op, args)

    def _hello(self, frame: Frame) -> dict[str, Any]:
        doc = _json(frame.payload)
        offered = {int(v) for v in doc.get("versions", []) if isinstance(v, int)}
        common = offered & set(self.versions)
        if not common:
            raise DeviceRefusal(
                ErrorCode.VERSION,
                f"the device speaks protocol versions {sorted(self.versions)}, "
                f"the technician {sorted(offered)}",
                hint="upgrade edgert on the older side (laptop or device image)",
            )
        self.version = max(common)
        return {"version": self.version, "max_payload": self.max_payload, **self.hello_info}


def _error(seq: int, code: int, message: str, hint: str | None) -> bytes:
    doc = {"code": int(code), "message": message[:500], "hint": hint}
    return encode_frame(MsgType.ERROR, seq, json.dumps(doc).encode())


def _code_for(exc: EdgertError) -> ErrorCode:
    from edgert.errors import ConfigError, SecurityError, StoreError

    if isinstance(exc, ConfigError):
        return ErrorCode.CONFIG
    if isinstance(exc, SecurityError):
        return ErrorCode.SECURITY
    if isinstance(exc, StoreError):
        return ErrorCode.STORE
    return ErrorCode.INTERNAL


@contextlib.contextmanager
def open_port(url: str, baud: int = DEFAULT_BAUD, *, timeout: float = 0.05) -> Iterator[Any]:
    """Open any pyserial URL; restore its settings and close it on the way out. Errors name the fix."""
    import serial

    try:
        port = serial.serial_for_url(url, baudrate=baud, timeout=timeout, write_timeout=30, exclusive=None)
    except serial.SerialException as exc:
        raise _port_error(url, exc) from None
    except ValueError as exc:
        raise ProvisionError(f"cannot open {url}: {exc}", hint="check the port URL and baud rate") from None
    saved = port.get_settings()
    try:
        yield port
    except serial.SerialException as exc:
        raise ProvisionError(
            f"serial port {url} failed: {exc}", hint="check the cable; the device may have been unplugged"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            port.apply_settings(saved)
        with contextlib.suppress(Exception):
            port.close()


def _port_error(url: str, exc: Exception) -> ProvisionError:
    code = getattr(exc, "errno", None)
    if code == errno.EACCES:
        return ProvisionError(
            f"permission denied on {url}",
            hint="add your user to the dialout group (sudo usermod -aG dialout $USER), then log in again",
        )
    if code == errno.ENOENT:
        return ProvisionError(f"no serial port {url}", hint=PORTS_HINT)
    if code == errno.EBUSY:
        return ProvisionError(
            f"{url} is busy", hint="close other programs using it (screen, minicom, ModemManager)"
        )
    return ProvisionError(f"cannot open {url}: {exc}", hint=PORTS_HINT)
