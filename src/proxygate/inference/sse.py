"""Server-sent events on a client connection: framing and the lazily sent head."""

from __future__ import annotations

import json
from collections.abc import Callable
from json.encoder import encode_basestring  # what compact_json does with a str (ensure_ascii=False)
from typing import TYPE_CHECKING, Any

from ..http.message import Headers, Request

if TYPE_CHECKING:
    from ..http.exchange import Exchange

SSE_HEADERS: Headers = [
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-cache"),
    (b"X-Accel-Buffering", b"no"),
]


# Compact JSON for event data. Built once: json.dumps with any non-default
# option builds a new encoder on every call, and this runs once per token.
compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


SLOT = "\ue000token\ue000"


def token_events(make: Callable[[str], dict[str, Any]]) -> Callable[[str], bytes]:
    """A renderer of one token's event, `encode_event(compact_json(make(token)))`, made fast.

    The event's JSON is rendered once per stream with `SLOT` for the token and
    the token's JSON string spliced in: the same bytes (a streamed token is
    the hot path, and its object differs only there).
    """
    rendered = compact_json(make(SLOT))
    slot = compact_json(SLOT)
    if rendered.count(slot) != 1:  # the slot's text appeared elsewhere too: render each time
        return lambda token: encode_event(compact_json(make(token)))
    before, after = rendered.split(slot)
    head, tail = b"data: " + before.encode(), after.encode() + b"\n\n"
    return lambda token: head + encode_basestring(token).encode() + tail


def encode_event(data: str, event: str | None = None) -> bytes:
    """One SSE event. Data is forced onto one line: a newline would end the event early."""
    line = " ".join(data.splitlines()) if ("\n" in data or "\r" in data) else data
    head = b"event: %s\n" % event.encode() if event else b""
    return head + b"data: " + line.encode() + b"\n\n"


class SseWriter:
    """Writes events; the response head goes out with the first one."""

    def __init__(self, ex: Exchange, req: Request) -> None:
        self.ex = ex
        self.chunked = req.version == b"1.1"
        self.started = False
        self.ended = False

    def _frame(self, payload: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(payload), payload) if self.chunked else payload

    async def send_raw(self, payload: bytes) -> None:
        out = self._frame(payload)
        if not self.started:
            self.started = True
            headers = list(SSE_HEADERS)
            if self.chunked:
                headers.append((b"Transfer-Encoding", b"chunked"))
            out = self.ex.start_response(200, headers, close=not self.chunked) + out
        self.ex.write(out)
        await self.ex.drain()

    async def send(self, data: str, event: str | None = None) -> None:
        await self.send_raw(encode_event(data, event))

    async def error(self, message: str) -> None:
        await self.send(message, event="error")

    def end(self) -> None:
        if self.started and not self.ended:
            self.ended = True
            if self.chunked:
                self.ex.write(b"0\r\n\r\n")
