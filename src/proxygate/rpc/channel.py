"""A gRPC client channel over one HTTP/2 connection, on the event loop itself.

Why not grpc.aio for the gateway's side: its calls complete on a poller
thread that wakes the event loop through a socket pair, and each message
costs a thread hand-off and several system calls. On the token path that
was most of the gateway's CPU per token and a wake-up more per token of
latency. Here the connection is an asyncio protocol: a frame is parsed in
`data_received` and its messages are handed to the waiting call directly.

What it implements is what the gateway needs from the workers: unary and
server-streaming calls without compression, deadlines (sent as
`grpc-timeout` and enforced here), cancellation (RST_STREAM), flow control
both ways, SETTINGS, PING, GOAWAY and a new connection when the old one is
gone. Workers stay grpcio servers.
"""

from __future__ import annotations

import asyncio
import collections
import struct
from collections.abc import Callable
from typing import Any, Generic, TypeVar, cast
from urllib.parse import unquote

import grpc
from hpack import Decoder
from hpack.exceptions import HPACKError

from . import frames as f

T = TypeVar("T")

STREAM_WINDOW = 1 << 20  # what one call may have buffered here before its reader takes it
CONNECTION_WINDOW = 1 << 24
MAX_MESSAGE = 16 * 1024 * 1024
USER_AGENT = "proxygate"
# A connection attempt to a host that never answers (SYN dropped) gives up after
# this long, as grpc's channels do; calls have their own deadlines meanwhile.
CONNECT_TIMEOUT = 20.0

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_HTTP_TO_CODE = {
    400: grpc.StatusCode.INTERNAL,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.UNIMPLEMENTED,
    429: grpc.StatusCode.UNAVAILABLE,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.UNAVAILABLE,
}
_RST_TO_CODE = {
    f.REFUSED_STREAM: grpc.StatusCode.UNAVAILABLE,  # the server did not start it: safe to retry
    f.CANCEL: grpc.StatusCode.CANCELLED,
    f.ENHANCE_YOUR_CALM: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class RpcError(Exception):
    """A call ended with a status other than OK (the shape of grpc.aio's AioRpcError)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Call(Generic[T]):
    """One call: async-iterate it for the server's messages; `cancel()` ends it."""

    def __init__(
        self,
        channel: Channel,
        head: bytes,
        request: bytes,
        deserialize: Callable[[bytes], T],
        timeout: float,
    ) -> None:
        self._loop = loop = asyncio.get_running_loop()
        self._deserialize = deserialize
        self.header_block = head + f.grpc_timeout(timeout)
        self.pending = f.grpc_message(request)  # request bytes not yet sent (flow control)
        self.send_window = 0
        self.stream_id = 0
        self.conn: Connection | None = None
        self.reader = f.MessageReader(MAX_MESSAGE)
        self.messages: collections.deque[bytes] = collections.deque()
        self.got_headers = False
        self.done = False
        self._error: BaseException | None = None
        self._unacked = 0
        self._waiter: asyncio.Future[None] | None = None
        self._timer = loop.call_later(timeout, self._expire)
        self._target = channel.target
        channel.start(self)

    # ---- the caller's side -----------------------------------------------------

    def __aiter__(self) -> Call[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            if self.messages:
                body = self.messages.popleft()
                self._consumed(len(body) + 5)
                try:
                    return self._deserialize(body)
                except Exception as exc:  # a message we cannot read ends the call, as grpc.aio does
                    error = RpcError(grpc.StatusCode.INTERNAL, f"cannot decode a response message: {exc}")
                    if self.done:  # the rest had arrived already: it ends here all the same
                        self.messages.clear()
                        self._error = error
                    else:
                        self._reset(error)
                    continue
            if self.done:
                if self._error is None:
                    raise StopAsyncIteration
                raise self._error
            self._waiter = waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def cancel(self) -> bool:
        """End the call now (the worker sees it cancelled); reading it raises CancelledError."""
        if self.done:
            return False
        self._reset(asyncio.CancelledError())
        return True

    def _consumed(self, n: int) -> None:
        self._unacked += n
        if self._unacked >= STREAM_WINDOW // 2 and self.conn is not None and not self.done:
            self.conn.write(f.window_update(self.stream_id, self._unacked))
            self._unacked = 0

    # ---- the connection's side ---------------------------------------------------

    def opened(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id

    def not_connected(self, exc: BaseException) -> None:
        self.finish(RpcError(grpc.StatusCode.UNAVAILABLE, f"cannot connect to {self._target}: {exc}"))

    def data(self, payload: bytes) -> None:
        if self.done:
            return
        try:
            messages = self.reader.feed(payload)
        except f.ProtocolError as exc:
            self._reset(RpcError(grpc.StatusCode.INTERNAL, str(exc)))
            return
        if messages:
            self.messages.extend(messages)
            self._wake()

    def headers(self, fields: list[tuple[str, str]]) -> None:
        """A header block: the response's head, or its trailers (its status).

        A head that also ends the stream is left to `ended_without_trailers`."""
        if self.done:
            return
        values = dict(fields)
        if not self.got_headers:
            self.got_headers = True
            status = values.get(":status", "")
            if status != "200":
                code = _HTTP_TO_CODE.get(int(status) if status.isdigit() else 0, grpc.StatusCode.UNKNOWN)
                self._reset(RpcError(code, f"HTTP status {status or 'missing'} from the worker"))
                return
            if "grpc-status" not in values:  # response headers; messages and trailers follow
                return
        self.finish(_status_error(values, self.reader.pending))

    def ended_without_trailers(self) -> None:
        self.finish(RpcError(grpc.StatusCode.INTERNAL, "stream ended without a status"))

    def reset_by_peer(self, code: int) -> None:
        name = _RST_TO_CODE.get(code, grpc.StatusCode.INTERNAL)
        self.finish(RpcError(name, f"stream reset by the worker (HTTP/2 error {code})"))

    def finish(self, error: BaseException | None) -> None:
        """The call is over: `error` (None for OK) after the messages already here."""
        if self.done:
            return
        self.done = True
        self._error = error
        self._timer.cancel()
        if self.conn is not None:
            self.conn.forget(self)
        self._wake()

    def _reset(self, error: BaseException) -> None:
        if self.conn is not None and not self.done:
            self.conn.write(f.rst_stream(self.stream_id, f.CANCEL))
        self.messages.clear()
        self.finish(error)

    def _expire(self) -> None:
        self._reset(RpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _status_error(values: dict[str, str], leftover: int) -> RpcError | None:
    raw = values.get("grpc-status", "")
    code = _CODES.get(int(raw), grpc.StatusCode.UNKNOWN) if raw.isdigit() else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.OK:
        if leftover:
            return RpcError(grpc.StatusCode.INTERNAL, "stream ended inside a message")
        return None
    return RpcError(code, unquote(values.get("grpc-message", "")))


class Connection(asyncio.Protocol):
    """One HTTP/2 connection to a worker, client side."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Call[Any]] = {}
        self.closed = False
        self.draining = False  # GOAWAY received: no new streams
        self._next_id = 1
        self._reader = f.FrameReader()
        self._decoder = Decoder()
        self._peer_window = f.DEFAULT_WINDOW  # the peer's initial stream window
        self._peer_max_frame = f.DEFAULT_MAX_FRAME
        self._send_window = f.DEFAULT_WINDOW  # connection-level, for our DATA
        self._recv_unacked = 0
        self._blocked: list[Call[Any]] = []  # calls with request bytes waiting for window
        self._block: tuple[int, int, bytearray] | None = None  # a header block awaiting CONTINUATION
        self._ping: asyncio.TimerHandle | None = None

    @property
    def usable(self) -> bool:
        return not self.closed and not self.draining and self._next_id < f.MAX_WINDOW - 2

    # ---- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        transport.write(
            f.PREFACE
            + f.settings_frame(
                {
                    f.SETTINGS_ENABLE_PUSH: 0,
                    f.SETTINGS_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                    f.SETTINGS_MAX_HEADER_LIST_SIZE: 65_536,
                }
            )
            + f.window_update(0, CONNECTION_WINDOW - f.DEFAULT_WINDOW)
        )

    def data_received(self, data: bytes) -> None:
        try:
            for fr in self._reader.feed(data):
                self._on_frame(fr)
        except (f.ProtocolError, HPACKError, struct.error) as exc:
            self.abort(f"protocol error from the worker: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._ping is not None:
            self._ping.cancel()
        self.channel.lost(self)
        why = f"connection to {self.channel.target} lost" + (f": {exc}" if exc else "")
        for call in list(self.streams.values()):
            call.finish(RpcError(grpc.StatusCode.UNAVAILABLE, why))
        self.streams.clear()

    # ---- calls -----------------------------------------------------------------

    def open(self, call: Call[Any]) -> None:
        sid = self._next_id
        self._next_id += 2
        call.opened(self, sid)
        call.send_window = self._peer_window
        self.streams[sid] = call
        head = f.frame(f.HEADERS, f.END_HEADERS, sid, call.header_block)
        self.write(head + self._request_data(call))

    def _request_data(self, call: Call[Any]) -> bytes:
        """As much of the call's request as the windows allow, as DATA frames."""
        out = []
        while call.pending:
            n = min(len(call.pending), call.send_window, self._send_window, self._peer_max_frame)
            if n <= 0:
                if call not in self._blocked:
                    self._blocked.append(call)
                break
            chunk, call.pending = call.pending[:n], call.pending[n:]
            call.send_window -= n
            self._send_window -= n
            out.append(f.frame(f.DATA, 0 if call.pending else f.END_STREAM, call.stream_id, chunk))
        return b"".join(out)

    def forget(self, call: Call[Any]) -> None:
        self.streams.pop(call.stream_id, None)
        if call in self._blocked:
            self._blocked.remove(call)
        if self.draining and not self.streams:
            self.close()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self, why: str) -> None:
        for call in list(self.streams.values()):
            call.finish(RpcError(grpc.StatusCode.UNAVAILABLE, why))
        if self.transport is not None:
            self.transport.abort()

    def probe(self, timeout: float) -> None:
        """Send a PING; no answer within `timeout` drops the connection (a dead peer or path)."""
        if self._ping is not None or self.closed:
            return
        self.write(f.frame(f.PING, 0, 0, b"probe\x00\x00\x00"))
        self._ping = asyncio.get_running_loop().call_later(timeout, self.abort, "no answer to PING")

    # ---- frames ----------------------------------------------------------------

    def _on_frame(self, fr: f.Frame) -> None:
        kind = fr.kind
        if self._block is not None and kind != f.CONTINUATION:
            raise f.ProtocolError("a header block was interrupted")
        if kind == f.DATA:
            self._on_data(fr)
        elif kind == f.HEADERS:
            block = f.frame_body(fr.flags, fr.payload, headers=True)
            if fr.flags & f.END_HEADERS:
                self._on_headers(fr.stream, fr.flags, block)
            else:
                self._block = (fr.stream, fr.flags, bytearray(block))
        elif kind == f.CONTINUATION:
            if self._block is None or self._block[0] != fr.stream:
                raise f.ProtocolError("unexpected CONTINUATION")
            self._block[2].extend(fr.payload)
            if fr.flags & f.END_HEADERS:
                stream, flags, pieces = self._block
                self._block = None
                self._on_headers(stream, flags, bytes(pieces))
        elif kind == f.WINDOW_UPDATE:
            self._on_window_update(fr.stream, struct.unpack(">I", fr.payload)[0] & f.MAX_WINDOW)
        elif kind == f.SETTINGS:
            if not fr.flags & f.ACK:
                self._on_settings(f.parse_settings(fr.payload))
        elif kind == f.PING:
            if fr.flags & f.ACK:
                if self._ping is not None:
                    self._ping.cancel()
                    self._ping = None
            else:
                self.write(f.frame(f.PING, f.ACK, 0, fr.payload))
        elif kind == f.RST_STREAM:
            call = self.streams.get(fr.stream)
            if call is not None:
                call.reset_by_peer(struct.unpack(">I", fr.payload)[0])
        elif kind == f.GOAWAY:
            self._on_goaway(struct.unpack_from(">II", fr.payload))
        elif kind == f.PUSH_PROMISE:
            raise f.ProtocolError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _on_data(self, fr: f.Frame) -> None:
        size = len(fr.payload)
        self._recv_unacked += size
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            self.write(f.window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        call = self.streams.get(fr.stream)
        if call is None:  # a call we reset: its bytes still count for the connection only
            return
        body = f.frame_body(fr.flags, fr.payload)
        if size > len(body):  # padding is never read: give its window back now
            self.write(f.window_update(fr.stream, size - len(body)))
        if body:
            call.data(body)
        if fr.flags & f.END_STREAM:
            call.ended_without_trailers()

    def _on_headers(self, stream: int, flags: int, block: bytes) -> None:
        fields = self._decoder.decode(block)  # always: the decoder's table must follow the peer's
        call = self.streams.get(stream)
        if call is not None:
            call.headers(fields)  # type: ignore[arg-type]
            if flags & f.END_STREAM and not call.done:
                call.ended_without_trailers()

    def _on_window_update(self, stream: int, increment: int) -> None:
        if stream == 0:
            self._send_window += increment
        else:
            call = self.streams.get(stream)
            if call is None:
                return
            call.send_window += increment
        self._unblock()

    def _on_settings(self, settings: dict[int, int]) -> None:
        window = settings.get(f.SETTINGS_INITIAL_WINDOW_SIZE)
        if window is not None:
            delta = window - self._peer_window
            self._peer_window = window
            for call in self.streams.values():
                call.send_window += delta
        self._peer_max_frame = settings.get(f.SETTINGS_MAX_FRAME_SIZE, self._peer_max_frame)
        self.write(f.frame(f.SETTINGS, f.ACK, 0))
        self._unblock()

    def _unblock(self) -> None:
        blocked, self._blocked = self._blocked, []
        for call in blocked:
            if not call.done:
                self.write(self._request_data(call))

    def _on_goaway(self, fields: tuple[int, int]) -> None:
        last_stream, code = fields[0] & f.MAX_WINDOW, fields[1]
        self.draining = True
        self.channel.lost(self)
        for sid, call in list(self.streams.items()):
            if sid > last_stream:  # never started there: safe to try again elsewhere
                call.finish(RpcError(grpc.StatusCode.UNAVAILABLE, f"worker going away (HTTP/2 error {code})"))
        if not self.streams:
            self.close()


class Channel:
    """Calls to one worker address, over one connection made when first needed."""

    def __init__(self, target: str) -> None:
        self.target = target
        host, _, port = target.rpartition(":")
        self._host = host.strip("[]") or "localhost"
        self._port = int(port)
        self._conn: Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: list[Call[Any]] = []
        self._heads: dict[str, bytes] = {}
        self._closed = False

    def unary_stream(self, method: str, request: bytes, deserialize: Callable[[bytes], T], timeout: float) -> Call[T]:
        return Call(self, self._head(method), request, deserialize, timeout)

    async def unary_unary(self, method: str, request: bytes, deserialize: Callable[[bytes], T], timeout: float) -> T:
        call = self.unary_stream(method, request, deserialize, timeout)
        try:
            answer = None
            async for message in call:
                answer = message
            if answer is None:
                raise RpcError(grpc.StatusCode.INTERNAL, "no response message")
            return answer
        finally:
            call.cancel()

    def _head(self, method: str) -> bytes:
        head = self._heads.get(method)
        if head is None:
            head = self._heads[method] = f.request_head(self.target, method, USER_AGENT)
        return head

    def start(self, call: Call[T]) -> None:
        if self._closed:
            call.not_connected(ConnectionError("channel closed"))
            return
        conn = self._conn
        if conn is not None and conn.usable:
            conn.open(call)
            return
        self._waiting.append(call)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        """Make the connection and open the calls waiting for it, or fail them."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                _, conn = await asyncio.get_running_loop().create_connection(
                    lambda: Connection(self), self._host, self._port
                )
        except (OSError, asyncio.CancelledError) as exc:  # TimeoutError is an OSError
            self._connecting = None
            waiting, self._waiting = self._waiting, []
            for call in waiting:
                call.not_connected(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._connecting = None
        self._conn = conn
        waiting, self._waiting = self._waiting, []
        for call in waiting:
            if not call.done:
                conn.open(call)

    def lost(self, conn: Connection) -> None:
        if self._conn is conn:
            self._conn = None

    def probe(self, timeout: float) -> None:
        if self._conn is not None:
            self._conn.probe(timeout)

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort("channel closed")
