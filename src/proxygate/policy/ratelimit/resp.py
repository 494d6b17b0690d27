"""RESP2, the Redis wire format, without sockets: encode commands, parse replies.

Only what a pipelined command client needs: commands are arrays of bulk
strings; replies are simple strings, errors, integers, bulk strings (or nil)
and arrays of those, parsed incrementally from whatever bytes have arrived.
"""

from __future__ import annotations

from typing import Union

Reply = Union[bytes, int, None, "RespError", list["Reply"]]


class RespError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`)."""

    @property
    def kind(self) -> str:
        return str(self).split(" ", 1)[0]


def encode_command(*args: bytes | str | int | float) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = repr(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    pass


class ReplyParser:
    """Feed bytes, take whole replies in order."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[Reply]:
        buf = self._buf + data if self._buf else data
        replies: list[Reply] = []
        pos = 0
        try:
            while pos < len(buf):
                reply, pos = _parse(buf, pos)
                replies.append(reply)
        except _Incomplete:
            pass
        self._buf = buf[pos:]
        return replies


def _line(buf: bytes, pos: int) -> tuple[bytes, int]:
    end = buf.find(b"\r\n", pos)
    if end == -1:
        raise _Incomplete
    return buf[pos:end], end + 2


def _parse(buf: bytes, pos: int) -> tuple[Reply, int]:
    kind = buf[pos : pos + 1]
    line, after = _line(buf, pos + 1)
    if kind == b"+":
        return line, after
    if kind == b":":
        return int(line), after
    if kind == b"-":
        return RespError(line.decode("utf-8", "replace")), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        end = after + size
        if len(buf) < end + 2:
            raise _Incomplete
        return buf[after:end], end + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            item, after = _parse(buf, after)
            items.append(item)
        return items, after
    raise ValueError(f"bad RESP type byte {kind!r}")
