"""One request and its response on a client connection: the API handlers answer through.

A handler gets the `Request` and an `Exchange`. The exchange writes the
response (a whole one with `send`, or a head from `start_response` and then
body bytes with `write`/`drain`) and remembers what the access log and the
metrics need: the status, the bytes written, whether a response started.
What belongs to the connection (parsing, timers, keep-alive, pipelining)
stays in `connection.py`; an exchange reaches it only to write and to ask
for the connection to end after this response.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import HttpError
from .message import Headers, Request, new_request_id, render_head

if TYPE_CHECKING:
    from ..config import GatewaySettings
    from .connection import ClientConnection


class Exchange:
    __slots__ = (
        "conn",
        "request",
        "response_started",
        "status",
        "bytes_in",
        "bytes_out",
        "ends_on_eof",
        "outlives_handler",
        "_continue_sent",
    )

    def __init__(self, conn: ClientConnection, request: Request | None) -> None:
        self.conn = conn
        self.request = request  # None when answering bytes that did not parse
        self.response_started = False
        self.status = 0  # 0 until a response starts (logged as 499 if none does)
        self.bytes_in: int | None = None  # None: the request body's size
        self.bytes_out = 0
        self.ends_on_eof = False
        self.outlives_handler = False  # ends with `finish`, not when its handler returns
        self._continue_sent = False

    @property
    def settings(self) -> GatewaySettings:
        return self.conn.settings

    @property
    def client_gone(self) -> bool:
        """The client connection is closed: nothing written now reaches anyone."""
        return self.conn.closed

    def end_on_client_eof(self) -> None:
        """A half-close from the client ends this request as a lost connection would.

        For a response nobody reads after the client is done sending (an
        inference stream): the handler is cancelled and the work upstream stops.
        """
        self.ends_on_eof = True

    def outlive_handler(self) -> None:
        """This exchange goes on after its handler returns, until `finish` (a CONNECT
        tunnel: no task waits out its life). The connection is busy until then."""
        self.outlives_handler = True

    def finish(self) -> None:
        """The end of an exchange that outlived its handler: logged and counted now."""
        assert self.outlives_handler
        self.conn.exchange_finished(self)

    def close_when_done(self) -> None:
        """The connection closes after this response (an Upgrade, a CONNECT, a cut body)."""
        self.conn.close_after = True

    def send_continue(self) -> None:
        """Tell a client waiting on `Expect: 100-continue` to send its body."""
        req = self.request
        if req is not None and req.expect_continue and not self._continue_sent and not self.response_started:
            self._continue_sent = True
            self.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def start_response(self, status: int, headers: Headers, *, close: bool = False) -> bytes:
        """The response head's bytes (request id and connection headers added).

        The caller writes them, usually joined with the first body bytes.
        """
        req = self.request
        conn = self.conn
        self.response_started = True
        self.status = status
        if close:
            conn.close_after = True
        if req is None:
            tail = b"X-Request-ID: %s\r\nConnection: close\r\n" % new_request_id().encode("ascii")
            return render_head(b"1.1", status, headers, tail)
        if conn.ends_after_response(req):
            connection = b"Connection: close\r\n"
        elif req.version == b"1.0":
            connection = b"Connection: keep-alive\r\n"
        else:
            connection = b""
        tail = b"X-Request-ID: %s\r\n%s%s" % (req.request_id.encode("ascii"), req.extra_head, connection)
        return render_head(b"1.1" if req.version == b"1.1" else b"1.0", status, headers, tail)

    def start_raw(self, status: int, head: bytes) -> None:
        """Write a head the caller rendered whole (CONNECT's `200 Connection established`),
        at once rather than at the loop pass's end: what follows it (a tunnel's bytes)
        goes to the transport directly."""
        self.response_started = True
        self.status = status
        self.conn.write_now(head)

    def write(self, data: bytes) -> None:
        if self.conn.write(data):
            self.bytes_out += len(data)

    async def drain(self) -> None:
        """Wait until the client has taken enough of what was written (write-stall timeout applies)."""
        conn = self.conn
        flow = conn.flow  # made only once the transport asked us to stop writing
        if flow is not None:
            await flow.drain(conn.settings.write_timeout)
        elif conn.closed:
            raise ConnectionResetError("connection closed")

    def send(self, status: int, headers: Headers, body: bytes = b"", *, close: bool = False) -> None:
        """A whole response with a Content-Length body."""
        req = self.request
        head_only = req is not None and req.method == "HEAD"
        head = self.start_response(status, headers + [(b"Content-Length", str(len(body)).encode())], close=close)
        self.write(head if head_only or not body else head + body)

    def send_error(self, error: Exception, *, close: bool = False) -> None:
        status = error.status if isinstance(error, HttpError) else 500
        reason = error.reason if isinstance(error, HttpError) else "internal error"
        headers: Headers = [(b"Content-Type", b"text/plain; charset=utf-8")]
        if isinstance(error, HttpError):
            headers += error.headers
        if self.request is not None:
            self.request.error = reason
        self.send(status, headers, reason.encode("utf-8", "replace") + b"\n", close=close)

    def cut_short(self, status: int) -> None:
        """The response started but could not be completed: log and count it as `status`."""
        self.status = status

    def relayed(self, bytes_up: int, bytes_down: int) -> None:
        """A tunnel ended: what it carried each way is this exchange's bytes in and out."""
        self.bytes_in = bytes_up
        self.bytes_out = bytes_down
