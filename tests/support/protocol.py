"""Driving `ClientConnection` in-process: a fake transport, a small application, a virtual clock.

No sockets and no sleeps: a test feeds bytes to the protocol, reads what it
wrote, and moves time forward. The virtual clock replaces the event loop's
time; whenever the loop has nothing ready and would wait for a timer, time
jumps to that timer at once, so a 30-second read timeout takes no real time
and fires exactly when it should.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from proxygate.config import GatewaySettings
from proxygate.http.connection import ClientConnection
from proxygate.http.exchange import Exchange
from proxygate.http.message import Request
from proxygate.http.write_batch import WriteBatch


class VirtualClock:
    """The loop's clock, moved only by the loop waiting for a timer (instantly) or by `advance`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 1000.0
        loop.time = lambda: self.now  # type: ignore[method-assign]
        selector: selectors.BaseSelector = loop._selector  # type: ignore[attr-defined]
        real_select = selector.select

        def select(timeout: float | None = None) -> list[Any]:
            events = real_select(0)
            if not events and timeout is not None and timeout > 0:
                self.now += timeout  # nothing to do until the next timer: go there
            return events

        selector.select = select  # type: ignore[method-assign]


def run(test: Callable[[VirtualClock], Coroutine[Any, Any, None]]) -> None:
    """Run an async test on a plain asyncio loop with a virtual clock."""
    loop = asyncio.new_event_loop()
    try:
        clock = VirtualClock(loop)
        loop.run_until_complete(asyncio.wait_for(test(clock), 3600))
    finally:
        # Connections a test leaves open still have serving tasks: end them quietly.
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(_gathered(left))
        loop.close()


async def _gathered(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


class FakeTransport:
    """What the protocol writes, and what it asked of its transport."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.reading = True
        self.protocol: asyncio.BaseProtocol | None = None  # a client connection, or an upstream one
        self.sock: socket.socket | None = None  # what get_extra_info("socket") gives, if a test sets one

    def write(self, data: bytes) -> None:
        assert not self.eof_written, "write after write_eof"
        if not self.closed:
            self.out += data

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol | None:
        return self.protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self._lost)

    def _lost(self) -> None:
        # As uvloop's transports do: the protocol is forgotten once it is told.
        protocol, self.protocol = self.protocol, None
        if protocol is not None:
            protocol.connection_lost(None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "socket": self.sock}.get(name, default)

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def take(self) -> bytes:
        """What was written since the last take (held small writes included)."""
        data, self.out = bytes(self.out), bytearray()
        return data


Handler = Callable[[Request, Exchange], Awaitable[None]]


class App:
    """An Application whose handlers tests choose per path; it records what finished."""

    def __init__(self, settings: GatewaySettings | None = None, **changes: Any) -> None:
        self.settings = replace(settings or GatewaySettings(), **changes)
        self.writes = WriteBatch()
        self.routes: dict[bytes, Handler] = {}
        self.done: list[tuple[str, bytes, int]] = []
        self.open = 0

    async def handle(self, request: Request, ex: Exchange) -> None:
        handler = self.routes.get(request.target)
        if handler is None:
            ex.send(200, [(b"Content-Type", b"text/plain")], b"ok " + request.target)
            return
        await handler(request, ex)

    def request_done(self, request: Request, ex: Exchange) -> None:
        self.done.append((request.method, request.target, ex.status))

    def connection_opened(self, conn: ClientConnection) -> None:
        self.open += 1

    def moved_at_accept(self, conn: ClientConnection) -> bool:
        return False

    def connection_closed(self, conn: ClientConnection) -> None:
        self.open -= 1


def connect(app: App) -> tuple[ClientConnection, FakeTransport]:
    conn = ClientConnection(app)
    transport = FakeTransport()
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def settle(passes: int = 5) -> None:
    """Let ready tasks and callbacks run (no time passes)."""
    for _ in range(passes):
        await asyncio.sleep(0)


def responses(data: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split written bytes into (status, headers, body) by Content-Length or chunked framing."""
    out = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete head: {head!r}"
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in lines[1:])}
        if status < 200:
            out.append((status, headers, b""))
            continue
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line, 16)
                body, data = body + data[:size], data[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(headers.get(b"content-length", b"0"))
            body, data = data[:length], data[length:]
        out.append((status, headers, body))
    return out
