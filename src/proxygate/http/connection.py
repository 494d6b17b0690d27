"""One client connection: httptools feeds requests in, one task answers them in order.

The protocol object does no I/O of its own beyond the transport it is given
(and, at shutdown, a look at how many bytes its socket holds unread):
`data_received` feeds the parser, parser callbacks build `Request`s into a
queue, and a single serving task (started when the queue fills, ending when it
empties) hands each to the application with an `Exchange` (exchange.py) that
writes its response. Pipelined requests are therefore answered strictly in
order. After a CONNECT the socket stops being HTTP: `detach` gives the
transport to the tunnel's protocol (proxy/tunnel.py).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import sys
import termios
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import httptools

from ..errors import BadRequest, HeadersTooLarge, HttpError, NotImplementedHttp, RequestTimeout, WriteStalled
from .deadline import IDLE, READ, Deadline
from .exchange import Exchange
from .flow import BodyBuffer, WriteFlow
from .message import Headers, ParseFailure, Request, new_request_id, pick_request_id
from .write_batch import WriteBatch

if TYPE_CHECKING:
    from ..config import GatewaySettings

log = logging.getLogger("proxygate.http")

# Pipelined requests held before we stop reading from the client.
MAX_PIPELINED = 32
# Request headers the connection itself acts on (lower-case); the rest only pass through.
_NOTED_HEADERS = frozenset({b"host", b"content-length", b"transfer-encoding", b"expect", b"x-request-id"})
# What a finished connection holds instead of its parser: one with no callbacks, shared.
_SPENT_PARSER = httptools.HttpRequestParser(object())


class Application(Protocol):
    settings: GatewaySettings
    writes: WriteBatch

    async def handle(self, request: Request, exchange: Exchange) -> None: ...

    def request_done(self, request: Request, exchange: Exchange) -> None: ...

    def connection_opened(self, conn: ClientConnection) -> None: ...

    def moved_at_accept(self, conn: ClientConnection) -> bool:
        """Whether the application passed this new connection to another process (it is not ours then)."""
        ...

    def connection_closed(self, conn: ClientConnection) -> None: ...


class ClientConnection(asyncio.Protocol):
    # Slots: with more than 30 attributes an instance outgrows CPython 3.11's
    # shared-key dict and gets a dict of its own, built up store by store.
    # Slotted, making one costs 1.6 instead of 2.2 us, and a request on a new
    # connection 317k instead of 329k instructions (callgrind).
    __slots__ = (
        "app",
        "_preface",
        "_first_request_owed",
        "settings",
        "writes",
        "loop",
        "transport",
        "peer_ip",
        "flow",
        "parser",
        "pending",
        "closed",
        "draining",
        "detached",
        "_serving",
        "_more",
        "deadline",
        "_reading_paused",
        "_parse_stopped",
        "_upgrade_tail",
        "_in_head",
        "_head_bytes",
        "_url",
        "_headers",
        "_head_size",
        "_parsing",
        "_content_length",
        "_chunked",
        "_expect_continue",
        "_host",
        "_rid",
        "exchange",
        "close_after",
        "client_eof",
        "moved",
        "served",
    )

    def __init__(self, app: Application, preface: bytes = b"", loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.app = app
        # Bytes another process read from this socket before handing it over
        # (inference/handoff.py): parsed before anything the socket delivers.
        self._preface = preface
        self.settings = app.settings
        self.writes = app.writes
        # The listener passes its loop: looking it up is a getpid() system call on 3.11.
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer_ip = ""
        # Made when the transport first asks us to stop writing (most connections
        # never fill its buffer): 2,400 instructions saved on each of the rest.
        self.flow: WriteFlow | None = None
        self.parser = httptools.HttpRequestParser(self)
        # A list, not a deque: it holds at most MAX_PIPELINED + 1, and making a
        # deque costs 1,900 instructions per connection (callgrind), a list 200.
        self.pending: list[Request | ParseFailure] = []
        self.closed = False
        self.draining = False  # set at shutdown: finish the current request, then close
        self._first_request_owed = False  # opened after the stop began (`shutdown`)
        self.detached = False  # the transport belongs to another protocol now (a tunnel)
        self._serving: asyncio.Task[None] | None = None
        self._more: asyncio.Future[None] | None = None  # the idle serving task waits here
        self.deadline = Deadline(self.loop, self._on_deadline)  # read or idle, one at a time
        self._reading_paused = False
        self._parse_stopped = False
        self._upgrade_tail = b""
        # per request being parsed; the rest of its fields (_url, _headers, _head_size,
        # _content_length, _chunked, _expect_continue, _host, _rid) are set by
        # `on_message_begin`, before anything reads them
        self._in_head = False
        self._head_bytes = 0
        self._parsing: Request | None = None
        # per response being written
        self.exchange: Exchange | None = None
        self.close_after = False  # close once the response being written is done
        self.client_eof = False  # the client half-closed: answer what it sent, then close
        self.moved = False  # handed over to another process: nothing more of it is ours
        self.served = 0  # requests answered on this connection

    # ---- transport callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer_ip = peer[0] if peer else ""
        self.app.connection_opened(self)
        if not self._preface and self.app.moved_at_accept(self):
            return
        self.deadline.arm(self.settings.read_timeout, READ)
        if self._preface:
            preface, self._preface = self._preface, b""
            self.data_received(preface)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self._end(ConnectionResetError("client connection lost"))
        if self._serving is not None and not self._serving.done() and not self.detached:
            # Nobody is left to read the answer: stop the handler (it cancels
            # its upstream work in turn).
            self._serving.cancel()
        # The parser holds this connection (its callbacks are our methods): with it
        # dropped, what is left of the connection is freed by reference counts,
        # not by the cyclic garbage collector, which would walk all of it first.
        self.parser = _SPENT_PARSER
        self.app.connection_closed(self)

    def _end(self, err: Exception) -> None:
        """Nothing more comes from this client here: stop the timers, fail every body still awaited."""
        self.closed = True
        self.deadline.cancel()
        if self.flow is not None:
            self.flow.close()
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.set_exception(err)
        for req in self.pending:
            if isinstance(req, Request) and req.body is not None:
                req.body.set_exception(err)
        current = self.current
        if current is not None and current.body is not None:
            current.body.set_exception(err)

    def pause_writing(self) -> None:
        if self.flow is None:
            self.flow = WriteFlow()
        self.flow.pause()

    def resume_writing(self) -> None:
        if self.flow is not None:
            self.flow.resume()

    def eof_received(self) -> bool | None:
        self.writes.flush()  # whatever happens next, what we wrote goes first
        if self._parsing is not None and self._parsing.body is not None:
            self._parsing.body.set_exception(ConnectionResetError("client closed mid-body"))
        ex = self.exchange
        if ex is not None and ex.ends_on_eof:
            return None  # closes the transport: the handler is cancelled as for a lost client
        if ex is not None or self.pending:
            # The client may half-close after its requests and still read the
            # answers: every request received before the FIN is answered.
            self.client_eof = True
            self._wake_server()
            return True
        return None

    def data_received(self, data: bytes) -> None:
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
        self._headers: Headers = []
        self._content_length: int | None = None
        self._chunked = False
        self._expect_continue = False
        self._host: bytes | None = None
        self._rid: bytes | None = None
        if self.deadline.kind != READ:
            # Not for a connection's first request: the read deadline armed when it
            # opened covers its head too (Go's read timeout also counts from the accept).
            self.deadline.arm(self.settings.read_timeout, READ)

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
        if lname not in _NOTED_HEADERS:
            return
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
        # Positional: keyword arguments cost half as much again as the rest of
        # building the request (callgrind), and this runs for every request.
        req = Request(
            parser.get_method().decode("ascii"),  # method
            self._url,  # target
            version.encode("ascii"),  # version
            self._headers,  # headers
            parser.should_keep_alive(),  # keep_alive
            BodyBuffer(self.transport, self._continue_hook()) if has_body else None,  # body
            pick_request_id(self._rid) if self._rid is not None else new_request_id(),  # request_id
            self.peer_ip,  # peer_ip
            self._host,  # host_header
            self._expect_continue and has_body,  # expect_continue
            parser.should_upgrade(),  # upgrade
            self._content_length,  # content_length
            self._chunked,  # chunked
        )
        self._parsing = req
        self.deadline.disarm()
        self.pending.append(req)
        if len(self.pending) > MAX_PIPELINED:
            self._pause_reading()
        self._wake_server()

    def _continue_hook(self) -> Callable[[], None] | None:
        return self._send_continue if self._expect_continue else None

    def _send_continue(self) -> None:
        if self.exchange is not None:
            self.exchange.send_continue()

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

    def _on_deadline(self, kind: int) -> None:
        if self.closed:
            return
        if kind == READ:
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
                        self.deadline.arm(self.settings.idle_timeout, IDLE)
                    self._more = self.loop.create_future()
                    await self._more
                    self._more = None
                    continue
                item = self.pending.pop(0)
                if self._reading_paused and not self._parse_stopped and len(self.pending) <= MAX_PIPELINED // 2:
                    self._resume_reading()
                if isinstance(item, ParseFailure):
                    Exchange(self, None).send_error(item.error, close=True)
                    self.close()
                    return
                if not await self._serve_one(item):
                    return
        finally:
            self._serving = None
            self._more = None

    @property
    def current(self) -> Request | None:
        """The request being answered."""
        return self.exchange.request if self.exchange is not None else None

    async def _serve_one(self, req: Request) -> bool:
        """Answer one request; whether the connection may serve another."""
        ex = self.exchange = Exchange(self, req)
        try:
            await self.app.handle(req, ex)
        except HttpError as exc:
            if ex.response_started:
                self.abort()
            else:
                ex.send_error(exc, close=req.body is not None and not req.body.finished_receiving)
        except (ConnectionError, WriteStalled, asyncio.TimeoutError) as exc:
            log.debug("connection %s: %s", self.peer_ip, exc)
            self.abort()
        except asyncio.CancelledError:
            self.abort()
            self.app.request_done(req, ex)
            raise
        except Exception:
            log.exception("handler failed for %s %s", req.method, req.target[:200])
            if ex.response_started:
                self.abort()
            else:
                ex.send_error(HttpError("internal error"), close=True)
        if ex.outlives_handler:
            return False  # its owner ends it (`exchange_finished`); a tunnel has the socket
        self.exchange_finished(ex)
        if self.closed or self.detached:
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

    def exchange_finished(self, ex: Exchange) -> None:
        """The exchange's request is answered: logged and counted, and the connection is free of it."""
        assert ex.request is not None
        self.app.request_done(ex.request, ex)
        self.exchange = None
        self.served += 1

    # ---- writing (for the exchange) ---------------------------------------------

    def write(self, data: bytes) -> bool:
        """Queue `data` for the client; False when the connection is gone."""
        transport = self.transport
        if transport is None or self.closed:
            return False
        self.writes.write(transport, data)
        return True

    def write_now(self, data: bytes) -> bool:
        """`write`, sent now instead of at the loop pass's end (after whatever the batch holds)."""
        transport = self.transport
        if transport is None or self.closed:
            return False
        self.writes.flush()
        transport.write(data)
        return True

    def ends_after_response(self, req: Request) -> bool:
        """Whether the response to `req` is this connection's last (it says `Connection: close`)."""
        return self.close_after or not req.keep_alive or self.draining or (self.client_eof and not self.pending)

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
            or self.exchange is None
            or self.exchange.request is not req
            or self.exchange.response_started
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

    # ---- the end of HTTP on this socket (CONNECT) ---------------------------------

    def detach(self, protocol: asyncio.BaseProtocol, on_deadline: Callable[[int], None]) -> bytes:
        """Give the transport to `protocol`; the bytes that followed the request head are returned.

        From now on the transport calls `protocol`, which must pass
        `connection_lost` on to this connection (the bookkeeping of a closed
        client). The exchange stays open until it is finished (a tunnel's
        outlives its handler: `Exchange.outlive_handler`), so shutdown still
        waits for the tunnel. The connection's `deadline` is the new owner's:
        what it arms calls `on_deadline`.
        """
        assert self.transport is not None
        self.detached = True
        self.deadline.pass_to(on_deadline)
        self.transport.set_protocol(protocol)
        tail, self._upgrade_tail = self._upgrade_tail, b""
        self._resume_reading()  # data arrives in a later loop pass: the caller forwards `tail` first
        return tail

    # ---- closing -------------------------------------------------------------

    def write_eof(self) -> bool:
        """Half-close towards the client, after everything written; False if it cannot be done."""
        transport = self.transport
        if transport is None or self.closed or not transport.can_write_eof():
            return False
        self.writes.flush()
        transport.write_eof()
        return True

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.writes.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def shutdown(self, first_request_owed: bool = False) -> None:
        """Graceful stop: idle connections close now, busy ones after their request.

        One whose client has sent bytes not parsed yet (in the socket, or
        handed over with it) is not idle: its request is read and answered. A
        stop under load finds many so, just accepted or taken from the accept
        queue (`take_queued`). `first_request_owed`: the connection opened
        after the stop began (taken from the queue, handed over by a sibling,
        or its TLS handshake ending), so its client connected before the stop;
        its first request is waited for, within the read timeout, even if none
        has arrived (over TLS it can come only after the handshake).
        """
        self.draining = True
        self._first_request_owed = self._first_request_owed or first_request_owed
        if self.busy or self._in_head or self._preface or (self._first_request_owed and not self.served):
            return
        if not self._unread():
            self.close()

    def _unread(self) -> bool:
        """Whether bytes from the client wait in the socket (not called per request: a system call)."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            return _unread_bytes(sock.fileno()) > 0
        except OSError:
            return False

    @property
    def busy(self) -> bool:
        """Handling a request (a tunnel's CONNECT lasts as long as the tunnel) or holding queued ones."""
        return self.exchange is not None or bool(self.pending)


class _ExpectationFailed(HttpError):
    status = 417


def _unread_bytes(fd: int) -> int:
    """Bytes received on socket `fd` and not read yet (FIONREAD)."""
    return int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)


def _parser_message(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:120]
