"""HTTP/2 framing for a gRPC client: frames, request headers, length-prefixed messages.

Pure functions and small parsers, no sockets (RFC 9113 section 4 and 6; the
gRPC over HTTP/2 protocol). Request header blocks use only HPACK literals
without indexing and without Huffman coding, so the encoder needs no state;
response header blocks are decoded by `hpack` (the server may use its dynamic
table and Huffman coding).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA = 0x0
HEADERS = 0x1
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY = 0x20

# Settings.
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Error codes (RST_STREAM, GOAWAY).
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1

_HEAD = struct.Struct(">IBI")  # length (24 bits, in the top of 32 with the type below), type, flags+stream


class ProtocolError(Exception):
    """The peer broke HTTP/2: the connection cannot be used any more."""


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">HBBBI", n >> 8, n & 0xFF, kind, flags, stream & MAX_WINDOW) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in settings.items()))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, struct.pack(">I", code))


def parse_settings(payload: bytes) -> dict[int, int]:
    if len(payload) % 6:
        raise ProtocolError("SETTINGS payload is not a multiple of 6 bytes")
    return {k: v for k, v in struct.iter_unpack(">HI", payload)}


def frame_body(flags: int, payload: bytes, *, headers: bool = False) -> bytes:
    """A DATA or HEADERS payload without its padding (and a HEADERS frame's priority fields)."""
    start, end = 0, len(payload)
    if flags & PADDED:
        if not payload:
            raise ProtocolError("padded frame without a pad length")
        start, end = 1, end - payload[0]
    if headers and flags & PRIORITY:
        start += 5
    if end < start:
        raise ProtocolError("padding longer than the frame")
    return payload if (start, end) == (0, len(payload)) else payload[start:end]


@dataclass(slots=True)
class Frame:
    kind: int
    flags: int
    stream: int
    payload: bytes


class FrameReader:
    """Splits a byte stream into frames; bytes of an incomplete frame wait for more."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame  # what we told the peer it may send
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        while end - pos >= 9:
            word, flags, stream = _HEAD.unpack_from(buf, pos)
            length, kind = word >> 8, word & 0xFF
            if length > self.max_frame:
                raise ProtocolError(f"frame of {length} bytes exceeds the {self.max_frame} we allow")
            if end - pos - 9 < length:
                break
            frames.append(Frame(kind, flags, stream & MAX_WINDOW, bytes(buf[pos + 9 : pos + 9 + length])))
            pos += 9 + length
        if pos:
            del buf[:pos]
        return frames


# ---- HPACK, request side ---------------------------------------------------------


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: bytes) -> bytes:
    return _integer(len(text), 7, 0) + text


def literal(name: bytes | int, value: bytes) -> bytes:
    """A header field as a literal without indexing: by static-table name index or by name."""
    if isinstance(name, int):
        return _integer(name, 4, 0) + _string(value)
    return b"\x00" + _string(name) + _string(value)


# Static table indices (RFC 7541 appendix A).
_METHOD_POST = b"\x83"
_SCHEME_HTTP = b"\x86"
_AUTHORITY = 1
_PATH = 4
_CONTENT_TYPE = 31
_USER_AGENT = 58


def request_head(authority: str, path: str, user_agent: str) -> bytes:
    """The parts of a gRPC request's header block that every call to `path` shares."""
    return b"".join(
        (
            _METHOD_POST,
            _SCHEME_HTTP,
            literal(_PATH, path.encode()),
            literal(_AUTHORITY, authority.encode()),
            literal(_CONTENT_TYPE, b"application/grpc"),
            literal(b"te", b"trailers"),
            literal(_USER_AGENT, user_agent.encode()),
        )
    )


def grpc_timeout(seconds: float) -> bytes:
    """The `grpc-timeout` header field: at most 8 digits, in the finest unit that fits."""
    micros = max(1, int(seconds * 1_000_000))
    for unit, scale in ((b"u", 1), (b"m", 1_000), (b"S", 1_000_000), (b"M", 60_000_000)):
        value = -(-micros // scale)
        if value < 100_000_000:
            return literal(b"grpc-timeout", b"%d%s" % (value, unit))
    return literal(b"grpc-timeout", b"99999999H")


# ---- gRPC messages ---------------------------------------------------------------


def grpc_message(body: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return struct.pack(">BI", 0, len(body)) + body


class MessageReader:
    """Splits a stream's DATA bytes into gRPC message bodies."""

    def __init__(self, max_message: int) -> None:
        self.max_message = max_message
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        if self._buf:  # a message began in an earlier frame
            self._buf += data
            data = bytes(self._buf)
            self._buf.clear()
        out: list[bytes] = []
        pos, end = 0, len(data)
        while end - pos >= 5:
            compressed, length = struct.unpack_from(">BI", data, pos)
            if compressed:
                raise ProtocolError("compressed gRPC message, and we asked for none")
            if length > self.max_message:
                raise ProtocolError(f"gRPC message of {length} bytes exceeds {self.max_message}")
            if end - pos - 5 < length:
                break
            out.append(data[pos + 5 : pos + 5 + length])
            pos += 5 + length
        if pos < end:
            self._buf += data[pos:]
        return out

    @property
    def pending(self) -> int:
        return len(self._buf)
