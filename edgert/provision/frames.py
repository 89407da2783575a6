"""The provisioning frame codec (pure): COBS framing, a fixed header, a payload and a CRC32.

On the wire every frame is ``0x00 || COBS(header || payload || crc32) || 0x00``. COBS removes every zero
byte from the body, so ``0x00`` only ever ends a frame: after noise, a dropped byte or a corrupted
byte the decoder throws away what it holds and starts again at the next zero (resynchronisation).

Header (8 bytes, big-endian)::

    version  u8    protocol version (the layout of this header never changes between versions)
    type     u8    message type (see :class:`MsgType`)
    seq      u16   sequence number, chosen by the requester and echoed by the answer
    length   u32   payload length in bytes (at most the decoder's ``max_payload``)

The CRC32 (zlib, big-endian) covers header and payload. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

from edgert.errors import ProvisionError

__all__ = [
    "HEADER",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "Frame",
    "FrameDecoder",
    "MsgType",
    "ProtocolError",
    "cobs_decode",
    "cobs_encode",
    "decode_frame",
    "encode_frame",
    "max_encoded_size",
]

#: The protocol version this build speaks.
PROTOCOL_VERSION = 1
#: Largest payload a frame may carry (transfers use chunks of at most this).
MAX_PAYLOAD = 16 * 1024
HEADER = struct.Struct(">BBHI")
CRC = struct.Struct(">I")
DELIMITER = b"\x00"


class ProtocolError(ProvisionError):
    """A frame or message violates the provisioning protocol (bad COBS, CRC, length or type)."""


class MsgType(enum.IntEnum):
    """Message types; requests come from the technician's side, answers from the device."""

    HELLO = 0x01  # JSON {"versions": [...], "max_payload": n}
    REQUEST = 0x02  # JSON {"op": ..., "args": {...}}
    DATA = 0x03  # u64 offset || bytes (a chunk of the current transfer)
    ACK = 0x10  # JSON result of the request with the same seq
    NAK = 0x11  # "your last frame arrived damaged: send it again" (seq 0)
    ERROR = 0x12  # JSON {"code": n, "message": ..., "hint": ...}


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    version: int
    type: int
    seq: int
    payload: bytes


def cobs_encode(data: bytes) -> bytes:
    """Consistent Overhead Byte Stuffing: ``data`` with every zero byte removed (no delimiter added)."""
    out = bytearray()
    block = bytearray()
    for byte in data:
        if byte == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(byte)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def cobs_decode(data: bytes) -> bytes:
    """Invert :func:`cobs_encode`; ProtocolError on a zero byte or a code running past the end."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ProtocolError("COBS block code 0 inside a frame")
        end = i + code
        if end > n:
            raise ProtocolError("COBS block runs past the end of the frame")
        block = data[i + 1 : end]
        if 0 in block:
            raise ProtocolError("zero byte inside a COBS block")
        out += block
        i = end
        if code != 255 and i < n:
            out.append(0)
    return bytes(out)


def max_encoded_size(max_payload: int = MAX_PAYLOAD) -> int:
    """The longest COBS body (without delimiter) a frame with ``max_payload`` bytes can have."""
    raw = HEADER.size + max_payload + CRC.size
    return raw + raw // 254 + 1


def encode_frame(
    msg_type: int,
    seq: int,
    payload: bytes = b"",
    *,
    version: int = PROTOCOL_VERSION,
    max_payload: int = MAX_PAYLOAD,
) -> bytes:
    """The wire bytes of one frame, with a delimiter before and after it."""
    if len(payload) > max_payload:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds the frame limit of {max_payload}")
    if not (0 <= seq <= 0xFFFF and 0 <= msg_type <= 0xFF and 0 <= version <= 0xFF):
        raise ProtocolError("frame header field out of range")
    body = HEADER.pack(version, msg_type, seq, len(payload)) + payload
    # A leading delimiter too: noise that arrived before this frame cannot corrupt it.
    return DELIMITER + cobs_encode(body + CRC.pack(zlib.crc32(body))) + DELIMITER


def decode_frame(body: bytes, *, max_payload: int = MAX_PAYLOAD) -> Frame:
    """Decode one COBS body (delimiter removed); ProtocolError naming what is wrong."""
    raw = cobs_decode(body)
    if len(raw) < HEADER.size + CRC.size:
        raise ProtocolError(f"frame of {len(raw)} bytes is shorter than header and CRC")
    version, msg_type, seq, length = HEADER.unpack_from(raw)
    if length > max_payload:
        raise ProtocolError(f"frame declares {length} payload bytes, over the limit of {max_payload}")
    if len(raw) != HEADER.size + length + CRC.size:
        raise ProtocolError("frame length does not match its header")
    (crc,) = CRC.unpack_from(raw, len(raw) - CRC.size)
    if zlib.crc32(raw[: -CRC.size]) != crc:
        raise ProtocolError("frame CRC32 mismatch")
    return Frame(version, msg_type, seq, raw[HEADER.size : HEADER.size + length])


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back.

    Garbage, noise and damaged frames never raise: they are dropped and counted in ``dropped``
    (and ``damaged``, for bodies that looked like a frame but failed COBS, length or CRC checks),
    so the caller can answer with a NAK. The buffer never holds more than ``max_body`` bytes: a
    longer run without a delimiter is discarded up to the next zero byte.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.max_body = max_encoded_size(max_payload)
        self._buf = bytearray()
        self._skipping = False
        self.dropped = 0
        self.damaged = 0

    @property
    def buffered(self) -> int:
        """Bytes held waiting for a delimiter (never above ``max_body``)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Consume ``data``; return the frames it completed, in order."""
        frames: list[Frame] = []
        data = bytes(data)
        pos, n = 0, len(data)
        while pos < n:
            zero = data.find(0, pos)
            end = n if zero < 0 else zero
            if not self._skipping:
                if len(self._buf) + (end - pos) > self.max_body:
                    self._buf.clear()
                    self._skipping = True
                    self.dropped += 1
                else:
                    self._buf += data[pos:end]
            if zero < 0:
                break
            pos = zero + 1
            if self._skipping:
                self._skipping = False
                continue
            body = bytes(self._buf)
            self._buf.clear()
            if not body:
                continue  # back-to-back delimiters: idle line or a sender resynchronising us
            try:
                frames.append(decode_frame(body, max_payload=self.max_payload))
            except ProtocolError:
                self.dropped += 1
                self.damaged += 1
        return frames
