"""Connections to origin servers, and a pool that keeps them alive between requests.

`UpstreamConnection` parses one response at a time with httptools. A parser
is reused for the next exchange only when it stopped at a message boundary;
after a HEAD response (whose announced body never comes) a fresh one starts,
so the missing body cannot desynchronise the next response. `UpstreamPool`
keeps a bounded number of idle connections per host:port and hands them out
most-recently-used first.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import httptools

from ..http.deadline import READ, Deadline
from ..http.flow import BodyBuffer, WriteFlow
from ..http.message import Headers
from ..http.write_batch import WriteBatch
from .headers import CONNECTION_HEADERS, RESPONSE_SKIP, connection_tokens

Key = tuple[str, int]
P = TypeVar("P", bound=asyncio.BaseProtocol)


class Opener(Protocol):
    """How the pool opens a connection (a `Dialer`, or a unix-socket one)."""

    async def open(self, host: str, port: int, factory: Callable[[], P]) -> tuple[asyncio.Transport, P]: ...


@dataclass(slots=True)
class ResponseHead:
    status: int
    version: bytes
    headers: Headers  # end-to-end only: RESPONSE_SKIP ones are dropped while parsing
    keep_alive: bool
    content_length: int | None
    chunked: bool
    connection_named: set[bytes] | None  # names a Connection header listed: not forwarded either


def _fail_future(fut: asyncio.Future[ResponseHead], exc: Exception) -> None:
    """Fail `fut`. A waiter still gets `exc`; a future nobody awaits any more
    (its client left first) is not reported as "never retrieved" when collected."""
    fut.set_exception(exc)
    fut.exception()


class UpstreamClosed(ConnectionResetError):
    """The origin closed or reset the connection before a response head."""


class UpstreamConnection(asyncio.Protocol):
    def __init__(self, key: Key, writes: WriteBatch) -> None:
        self.key = key
        self._writes = writes
        # Kept: asyncio.get_event_loop() costs a getpid() syscall per call.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.flow = WriteFlow()
        self.closed = False
        self.idle_since = 0.0
        self.exchanges = 0
        self._parser: httptools.HttpResponseParser | None = None
        # A parser that ended at a message boundary, kept for the next exchange
        # (making one costs about as much as parsing a small response head).
        self._spare: httptools.HttpResponseParser | None = None
        self._at_boundary = False
        self._head: asyncio.Future[ResponseHead] | None = None
        self._head_only = False
        # When the response head must have come (expect_head_within); made on first use.
        self._deadline: Deadline | None = None
        self._headers: Headers = []
        self._named: set[bytes] | None = None
        self._content_length: int | None = None
        self._chunked = False
        self._informational = False
        self.body: BodyBuffer | None = None
        self.complete = False
        self.reusable = False
        self.got_bytes = False

    # ---- exchange --------------------------------------------------------------

    def begin(self, head_only: bool) -> asyncio.Future[ResponseHead]:
        """Expect one response (after the caller writes a request)."""
        self._parser = self._spare or httptools.HttpResponseParser(self)
        self._spare = None
        self._at_boundary = False
        self._head = self._loop.create_future()
        self._head_only = head_only
        self.body = None
        self.complete = False
        self.reusable = False
        self.got_bytes = False
        return self._head

    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            raise UpstreamClosed("upstream connection closed")
        self._writes.write(self.transport, data)

    def expect_head_within(self, timeout: float | None) -> None:
        """Fail the wait for this exchange's response head with TimeoutError if it
        has not come `timeout` seconds from now (no limit for None or 0).

        The deadline moves lazily (http/deadline.py), so a kept-alive
        connection pays no loop timer per exchange.
        """
        if not timeout:
            return
        if self._deadline is None:
            self._deadline = Deadline(self._loop, self._head_overdue)
        self._deadline.arm(timeout, READ)

    def _head_overdue(self, _kind: int) -> None:
        head = self._head
        if head is not None and not head.done():
            head.set_exception(asyncio.TimeoutError())

    def park(self) -> None:
        """Between exchanges: any byte that arrives now is a protocol error."""
        self._spare = self._parser if self._at_boundary else None
        self._parser = None
        self._head = None

    # ---- transport callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            # Bytes while idle: the origin is confused or closing. Never reuse.
            self.abort()
            return
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # 101 Switching Protocols is not relayed by this proxy (yet).
            self._fail(UpstreamClosed("upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamClosed(f"malformed response from upstream: {str(exc)[:80]}"))

    def eof_received(self) -> bool | None:
        self._on_close(None)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_close(exc)
        self.closed = True
        self.flow.close()
        if self._deadline is not None:
            self._deadline.cancel()

    def pause_writing(self) -> None:
        self.flow.pause()

    def resume_writing(self) -> None:
        self.flow.resume()

    def _on_close(self, exc: Exception | None) -> None:
        self.reusable = False
        head = self._head
        if head is not None and not head.done():
            _fail_future(head, UpstreamClosed("upstream closed the connection before responding"))
            return
        body = self.body
        if body is not None and not self.complete:
            if self._content_length is None and not self._chunked:
                # A response without length ends when the connection does.
                self.complete = True
                body.feed_eof()
            else:
                body.set_exception(UpstreamClosed("upstream closed mid-response"))

    def _fail(self, exc: Exception) -> None:
        head = self._head
        if head is not None and not head.done():
            _fail_future(head, exc)
        elif self.body is not None and not self.complete:
            self.body.set_exception(exc)
        self.abort()

    # ---- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Bytes after a complete response, before we asked for another:
            # the origin is broken or confused. Keep the response we have,
            # never reuse the connection.
            raise UpstreamClosed("upstream sent bytes after a complete response")
        self._at_boundary = False
        self._headers = []
        self._named = None
        self._content_length = None
        self._chunked = False

    def on_header(self, name: bytes, value: bytes) -> None:
        # Hop-by-hop headers are dropped here, while the name is lowered
        # anyway, instead of in a second pass over the list.
        lname = name.lower()
        if lname == b"content-length":
            self._content_length = int(value)
        elif lname in RESPONSE_SKIP:
            if lname == b"transfer-encoding":
                self._chunked = value.lower().find(b"chunked") >= 0  # not `in`: no TypeError made and dropped
            elif lname in CONNECTION_HEADERS:
                self._named = (self._named or set()) | connection_tokens(value)
            return
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None and self._head is not None
        status = parser.get_status_code()
        if 100 <= status < 200:
            # Interim responses (100 Continue, 103 Early Hints) are swallowed;
            # llhttp moves on to the real response on the same parser.
            self._informational = True
            return
        self._informational = False
        if self._deadline is not None:
            self._deadline.disarm()
        head = ResponseHead(  # positional: cheaper than keywords, once per response
            status,
            parser.get_http_version().encode("ascii"),  # version
            self._headers,
            parser.should_keep_alive(),
            self._content_length,
            self._chunked,
            self._named - RESPONSE_SKIP if self._named else None,  # connection_named
        )
        no_body = self._head_only or status in (204, 304) or self._content_length == 0
        self.body = BodyBuffer(self.transport)
        if no_body:
            self.body.feed_eof()
            self._finish_message(head.keep_alive)
        if not self._head.done():
            self._head.set_result(head)

    def on_body(self, body: bytes) -> None:
        if self.body is not None and not self.complete:
            self.body.feed(body)

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._at_boundary = True
        if self.complete:
            return
        if self.body is not None:
            self.body.feed_eof()
        assert self._parser is not None
        self._finish_message(self._parser.should_keep_alive())

    def _finish_message(self, keep_alive: bool) -> None:
        self.complete = True
        self.reusable = keep_alive and not self.closed
        self.exchanges += 1

    # ---- closing -------------------------------------------------------------

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self._writes.flush()
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections per host:port, bounded, dropped when stale."""

    def __init__(self, dialer: Opener, idle_per_host: int, idle_timeout: float, writes: WriteBatch) -> None:
        self.dialer = dialer
        self.writes = writes
        self.idle_per_host = idle_per_host
        self.idle_timeout = idle_timeout or 60.0
        self._idle: dict[Key, deque[UpstreamConnection]] = {}

    def idle(self, host: str, port: int) -> UpstreamConnection | None:
        """A pooled connection to host:port, most recently used first; None if there is none.

        Not a coroutine: most requests find one, and a coroutine per request
        costs more than this lookup (`dial` makes a new one).
        """
        idle = self._idle.get((host, port))
        if idle:
            now = time.monotonic()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.idle_timeout:
                    return conn
                conn.close()
        return None

    async def dial(self, host: str, port: int) -> UpstreamConnection:
        """A new connection to host:port."""
        key = (host, port)
        _transport, conn = await self.dialer.open(host, port, lambda: UpstreamConnection(key, self.writes))
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Give a connection back after a whole exchange; closed if it cannot be reused."""
        if not (conn.complete and conn.reusable) or conn.closed:
            conn.close()
            return
        conn.park()
        idle = self._idle.setdefault(conn.key, deque())
        if len(idle) >= self.idle_per_host:
            idle.popleft().close()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def sweep(self) -> None:
        """Close idle connections older than the idle timeout."""
        now = time.monotonic()
        for key in list(self._idle):
            idle = self._idle[key]
            fresh = deque(c for c in idle if not c.closed and now - c.idle_since < self.idle_timeout)
            for conn in idle:
                if conn not in fresh:
                    conn.close()
            if fresh:
                self._idle[key] = fresh
            else:
                del self._idle[key]

    def close_all(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
