"""One client connection: httptools feeds requests in, one task answers them in order.

The protocol object does no I/O of its own beyond the transport it is given:
`data_received` feeds the parser, parser callbacks build `Request`s into a
queue, and a single serving task (started when the queue fills, ending when it
empties) hands each to the application and writes the response. Pipelined
requests are therefore answered strictly in order. A connection can be turned
into a byte relay (`become_relay`) for CONNECT tunnels.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import httptools

from ..errors import BadRequest, HeadersTooLarge, HttpError, NotImplementedHttp, RequestTimeout, WriteStalled
from .flow import BodyBuffer, WriteFlow
from .message import Headers, ParseFailure, Request, new_request_id, pick_request_id, render_head
from .write_batch import WriteBatch

if TYPE_CHECKING:
    from ..config import GatewaySettings

log = logging.getLogger("proxygate.http")

# Pipelined requests held before we stop reading from the client.
MAX_PIPELINED = 32

_NO_TIMER, _READ_TIMER, _IDLE_TIMER = 0, 1, 2


class Application(Protocol):
    settings: GatewaySettings
    writes: WriteBatch

    async def handle(self, request: Request, conn: ClientConnection) -> None: ...

    def request_done(self, request: Request, conn: ClientConnection) -> None: ...

    def connection_opened(self, conn: ClientConnection) -> None: ...

    def connection_closed(self, conn: ClientConnection) -> None: ...


class RelaySink(Protocol):
    """Where a relayed connection's bytes go (the far side of a tunnel)."""

    def from_client(self, data: bytes) -> None: ...

    def client_eof(self) -> None: ...

    def client_lost(self) -> None: ...

    def client_paused_writing(self) -> None: ...

    def client_resumed_writing(self) -> None: ...


class ClientConnection(asyncio.Protocol):
    def __init__(self, app: Application, preface: bytes = b"") -> None:
        self.app = app
        # Bytes another process read from this socket before handing it over
        # (inference/handoff.py): parsed before anything the socket delivers.
        self._preface = preface
        self.settings = app.settings
        self.writes = app.writes
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        self.flow = WriteFlow()
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque[Request | ParseFailure] = deque()
        self.closed = False
        self.draining = False  # set at shutdown: finish the current request, then close
        self.relay: RelaySink | None = None
        self._serving: asyncio.Task[None] | None = None
        self._more: asyncio.Future[None] | None = None  # the idle serving task waits here
        # One lazily moved timer: changing the deadline is an assignment; the
        # handle is rescheduled only when the deadline moves earlier.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._deadline = 0.0
        self._deadline_kind = _NO_TIMER
        self._reading_paused = False
        self._parse_stopped = False
        self._upgrade_tail = b""
        # per request being parsed
        self._in_head = False
        self._head_bytes = 0
        self._url = b""
        self._headers: Headers = []
        self._head_size = 0
        self._parsing: Request | None = None
        self._content_length: int | None = None
        self._chunked = False
        self._expect_continue = False
        self._host: bytes | None = None
        self._rid: bytes | None = None
        # per response being written
        self.current: Request | None = None
        self.response_started = False
        self.status = 0
        self.bytes_out = 0
        self.close_after = False
        self.client_eof = False  # the client half-closed: answer what it sent, then close
        self.moved = False  # handed over to another process: nothing more of it is ours
        self._continue_sent = False

    # ---- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.app.connection_opened(self)
        self._arm(self.settings.read_timeout, _READ_TIMER)
        if self._preface:
            preface, self._preface = self._preface, b""
            self.data_received(preface)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self._end(ConnectionResetError("client connection lost"))
        if self.relay is not None:
            self.relay.client_lost()
        if self._serving is not None and not self._serving.done() and self.relay is None:
            # Nobody is left to read the answer: stop the handler (it cancels
            # its upstream work in turn).
            self._serving.cancel()
        self.app.connection_closed(self)

    def _end(self, err: Exception) -> None:
        """Nothing more comes from this client here: stop the timers, fail every body still awaited."""
        self.closed = True
        self._cancel_timer()
        self.flow.close()
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.set_exception(err)
        for req in self.pending:
            if isinstance(req, Request) and req.body is not None:
                req.body.set_exception(err)
        if self.current is not None and self.current.body is not None:
            self.current.body.set_exception(err)

    def pause_writing(self) -> None:
        self.flow.pause()
        if self.relay is not None:
            self.relay.client_paused_writing()

    def resume_writing(self) -> None:
        self.flow.resume()
        if self.relay is not None:
            self.relay.client_resumed_writing()

    def eof_received(self) -> bool | None:
        self.writes.flush()  # whatever happens next, what we wrote goes first
        if self.relay is not None:
            self.relay.client_eof()
            return True  # keep our sending half open: half-close
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.set_exception(ConnectionResetError("client closed mid-body"))
        if self.current is not None and self.current.abort_on_client_eof:
            return None  # closes the transport: the handler is cancelled as for a lost client
        if self.current is not None or self.pending:
            # The client may half-close after its requests and still read the
            # answers: every request received before the FIN is answered.
            self.client_eof = True
            self._wake_server()
            return True
        return None

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay is not None:
            relay.from_client(data)
            return
        if self._parse_stopped:
            self._upgrade_tail += data
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0]
            self._upgrade_tail = data[offset:]
            self._stop_parsing()
            return
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            self._parse_failed(cause if isinstance(cause, HttpError) else BadRequest("malformed request"))
            return
        except httptools.HttpParserError as exc:
            self._parse_failed(BadRequest(f"malformed request: {_parser_message(exc)}"))
            return
        if self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self.settings.max_header_size:
                self._parse_failed(HeadersTooLarge("request line and headers too large"))

    # ---- parser callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._head_size = 0
        self._url = b""
        self._headers = []
        self._content_length = None
        self._chunked = False
        self._expect_continue = False
        self._host = None
        self._rid = None
        self._arm(self.settings.read_timeout, _READ_TIMER)

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > self.settings.max_header_size:
            raise HeadersTooLarge("request line too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.settings.max_header_size:
            raise HeadersTooLarge("request headers too large")
        self._headers.append((name, value))
        lname = name.lower()
        if lname == b"host":
            if self._host is not None:
                raise BadRequest("more than one Host header")
            self._host = value
        elif lname == b"content-length":
            self._content_length = int(value)  # llhttp has validated the digits
        elif lname == b"transfer-encoding":
            codings = [c.strip() for c in value.lower().split(b",")]
            if codings[-1] != b"chunked":
                # RFC 9112 6.3: without a final chunked the body's length is unknowable.
                raise BadRequest("Transfer-Encoding must end with chunked")
            if any(c not in (b"chunked", b"identity") for c in codings):
                raise NotImplementedHttp(f"unsupported Transfer-Encoding: {value.decode('latin-1')[:100]}")
            self._chunked = True
        elif lname == b"expect":
            if value.lower() != b"100-continue":
                raise _ExpectationFailed(f"unsupported Expect: {value.decode('latin-1')}")
            self._expect_continue = True
        elif lname == b"x-request-id":
            self._rid = value

    def on_headers_complete(self) -> None:
        self._in_head = False
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise BadRequest("the request line needs a version: HTTP/1.1 or HTTP/1.0")
        if self._chunked and version == "1.0":
            raise BadRequest("chunked Transfer-Encoding in an HTTP/1.0 request")
        if self._host is None and version == "1.1" and parser.get_method() != b"CONNECT":
            raise BadRequest("HTTP/1.1 request without a Host header")
        has_body = self._chunked or bool(self._content_length)
        req = Request(
            method=parser.get_method().decode("ascii"),
            target=self._url,
            version=version.encode("ascii"),
            headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            body=BodyBuffer(self.transport, self._continue_hook()) if has_body else None,
            request_id=pick_request_id(self._rid) if self._rid is not None else new_request_id(),
            peer_ip=self.peer_ip,
            host_header=self._host,
            expect_continue=self._expect_continue and has_body,
            upgrade=parser.should_upgrade(),
            content_length=self._content_length,
            chunked=self._chunked,
        )
        self._parsing = req
        self._disarm()
        self.pending.append(req)
        if len(self.pending) > MAX_PIPELINED:
            self._pause_reading()
        self._wake_server()

    def _continue_hook(self) -> Callable[[], None] | None:
        return self.send_continue if self._expect_continue else None

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.feed(body)

    def on_message_complete(self) -> None:
        req = self._parsing
        if req is not None and req.body is not None:
            req.body.feed_eof()
        self._parsing = None

    # ---- parse-level failures ----------------------------------------------

    def _stop_parsing(self) -> None:
        """CONNECT (or Upgrade): the bytes after the head are not HTTP."""
        self._parse_stopped = True
        self._pause_reading()

    def _parse_failed(self, error: HttpError) -> None:
        # Answer in order: requests before the bad bytes still get their
        # responses, then the error, then the connection closes.
        self._stop_parsing()
        self._in_head = False
        if self._parsing is not None and self._parsing.body is not None:
            # The bad bytes were inside a body being read: the handler sees it.
            self._parsing.body.set_exception(error)
            self._parsing = None
            self.close_after = True
            return
        self.pending.append(ParseFailure(error))
        self._wake_server()

    # ---- timers --------------------------------------------------------------

    def _arm(self, delay: float, kind: int) -> None:
        if delay <= 0:
            self._deadline_kind = _NO_TIMER
            return
        deadline = self.loop.time() + delay
        self._deadline = deadline
        self._deadline_kind = kind
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _disarm(self) -> None:
        self._deadline_kind = _NO_TIMER

    def _cancel_timer(self) -> None:
        self._deadline_kind = _NO_TIMER
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        kind = self._deadline_kind
        if kind == _NO_TIMER or self.closed:
            return
        if self.loop.time() < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        self._deadline_kind = _NO_TIMER
        if kind == _READ_TIMER:
            self._on_read_timeout()
        else:
            self._on_idle_timeout()

    def _on_read_timeout(self) -> None:
        if self.current is not None:
            return
        if self._in_head or self._head_bytes:
            self._parse_failed(RequestTimeout("timed out reading request headers"))
        else:
            # Nothing of a request arrived: just close, as Go/Squid do.
            self.abort()

    def _on_idle_timeout(self) -> None:
        if not self.busy and not self._in_head:
            self.close()

    # ---- flow control --------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    # ---- serving -------------------------------------------------------------

    def _wake_server(self) -> None:
        if self._serving is None:
            self._serving = self.loop.create_task(self._serve())
        elif self._more is not None and not self._more.done():
            self._more.set_result(None)

    async def _serve(self) -> None:
        """Answer queued requests in order; between requests, wait for more."""
        try:
            while not self.closed:
                if not self.pending:
                    if self.draining or self.client_eof:
                        self.close()
                        return
                    if not self._in_head:
                        self._arm(self.settings.idle_timeout, _IDLE_TIMER)
                    self._more = self.loop.create_future()
                    await self._more
                    self._more = None
                    continue
                item = self.pending.popleft()
                if self._reading_paused and not self._parse_stopped and len(self.pending) <= MAX_PIPELINED // 2:
                    self._resume_reading()
                if isinstance(item, ParseFailure):
                    self._begin(None)
                    self.send_error(item.error, close=True)
                    self.current = None
                    self.close()
                    return
                if not await self._serve_one(item):
                    return
        finally:
            self._serving = None
            self._more = None

    def _begin(self, req: Request | None) -> None:
        self.current = req
        self.response_started = False
        self.status = 0
        self.bytes_out = 0
        self._continue_sent = False

    async def _serve_one(self, req: Request) -> bool:
        """Answer one request; whether the connection may serve another."""
        self._begin(req)
        try:
            await self.app.handle(req, self)
        except HttpError as exc:
            if self.response_started:
                self.abort()
            else:
                self.send_error(exc, close=req.body is not None and not req.body.finished_receiving)
        except (ConnectionError, WriteStalled, asyncio.TimeoutError) as exc:
            log.debug("connection %s: %s", self.peer_ip, exc)
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            self.app.request_done(req, self)
            raise
        except Exception:
            log.exception("handler failed for %s %s", req.method, req.target[:200])
            if self.response_started:
                self.abort()
            else:
                self.send_error(HttpError("internal error"), close=True)
        self.app.request_done(req, self)
        self.current = None
        if self.closed or self.relay is not None:
            return False
        if req.upgrade or req.method == "CONNECT":
            # After CONNECT/Upgrade the bytes that follow are not HTTP: this
            # connection cannot carry another request.
            self.close_after = True
        body = req.body
        if body is not None and not body.finished_receiving:
            # The handler did not read the whole upload: the bytes left
            # would be parsed as the next request. Close instead.
            self.close_after = True
        if self.close_after or not req.keep_alive or self.draining:
            self.close()
            return False
        return True

    # ---- response API for handlers ------------------------------------------

    def send_continue(self) -> None:
        """Tell a client waiting on `Expect: 100-continue` to send its body."""
        req = self.current
        if req is not None and req.expect_continue and not self._continue_sent and not self.response_started:
            self._continue_sent = True
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def start_response(self, status: int, headers: Headers, *, close: bool = False) -> bytes:
        """The response head's bytes (request id and connection headers added).

        The caller writes them, usually joined with the first body bytes.
        """
        req = self.current
        self.response_started = True
        self.status = status
        if close:
            self.close_after = True
        if req is None:
            tail = b"X-Request-ID: %s\r\nConnection: close\r\n" % new_request_id().encode("ascii")
            return render_head(b"1.1", status, headers, tail)
        if self.close_after or not req.keep_alive or self.draining or (self.client_eof and not self.pending):
            connection = b"Connection: close\r\n"
        elif req.version == b"1.0":
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        tail = b"X-Request-ID: %s\r\n%s%s" % (req.request_id.encode("ascii"), req.extra_head, connection)
        return render_head(b"1.1" if req.version == b"1.1" else b"1.0", status, headers, tail)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.bytes_out += len(data)
            self.writes.write(self.transport, data)

    async def drain(self) -> None:
        await self.flow.drain(self.settings.write_timeout)

    def send(self, status: int, headers: Headers, body: bytes = b"", *, close: bool = False) -> None:
        """A whole response with a Content-Length body."""
        req = self.current
        head_only = req is not None and req.method == "HEAD"
        head = self.start_response(status, headers + [(b"Content-Length", str(len(body)).encode())], close=close)
        self.write(head if head_only or not body else head + body)

    def send_error(self, error: Exception, *, close: bool = False) -> None:
        status = error.status if isinstance(error, HttpError) else 500
        reason = error.reason if isinstance(error, HttpError) else "internal error"
        headers: Headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        if isinstance(error, HttpError):
            headers += error.headers
        if self.current is not None:
            self.current.error = reason
        self.send(status, headers, reason.encode("utf-8", "replace") + b"\n", close=close)

    # ---- handing the connection to another process ------------------------------

    def handover_bytes(self, req: Request) -> bytes | None:
        """What another process must parse to carry on from `req` with this socket
        (its head, rebuilt, and the body bytes received so far), with reading
        paused; None when the connection cannot move now: more was pipelined,
        the body is chunked or being read, a response is under way, or it is TLS."""
        transport = self.transport
        body = req.body
        if (
            transport is None
            or self.closed
            or self.pending
            or self._in_head
            or self._parse_stopped
            or self.response_started
            or self.current is not req
            or (body is not None and (req.chunked or not body.untouched))
            or transport.get_extra_info("sslcontext") is not None
        ):
            return None
        self.writes.flush()
        if transport.get_write_buffer_size():
            return None
        self._pause_reading()
        head = [b"%s %s HTTP/%s\r\n" % (req.method.encode("ascii"), req.target, req.version)]
        head += [name + b": " + value + b"\r\n" for name, value in req.headers]
        head.append(b"\r\n")
        return b"".join(head) + (body.peek() if body is not None else b"")

    def handover_failed(self) -> None:
        """The other process could not take the socket: go on serving it here."""
        self._resume_reading()

    def handed_over(self) -> None:
        """Another process has the socket now: forget it without a word to the client."""
        self.moved = True
        if self.closed:
            return  # the client left meanwhile: connection_lost did the bookkeeping
        self._end(ConnectionResetError("connection handed over"))
        self.app.connection_closed(self)
        if self.transport is not None:
            self.transport.close()  # our descriptor only: the other process's keeps the connection open

    # ---- relay mode (CONNECT) ------------------------------------------------

    def take_upgrade_tail(self) -> bytes:
        tail, self._upgrade_tail = self._upgrade_tail, b""
        return tail

    def become_relay(self, sink: RelaySink) -> None:
        """From now on every byte from the client goes to `sink`."""
        self.relay = sink
        self._disarm()
        tail = self.take_upgrade_tail()
        if tail:
            sink.from_client(tail)
        self._resume_reading()

    def write_eof(self) -> bool:
        """Half-close towards the client, after everything written; False if it cannot be done."""
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            return False
        self.writes.flush()
        transport.write_eof()
        return True

    def pause_client_reading(self) -> None:
        self._pause_reading()

    def resume_client_reading(self) -> None:
        self._resume_reading()

    # ---- closing -------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.writes.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their request."""
        self.draining = True
        if not self.busy and not self._in_head:
            self.close()

    @property
    def busy(self) -> bool:
        """Handling a request, holding queued ones, or relaying a tunnel."""
        return self.current is not None or bool(self.pending) or self.relay is not None


class _ExpectationFailed(HttpError):
    status = 417


def _parser_message(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:120]
