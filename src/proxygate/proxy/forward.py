"""Absolute-form requests (`GET http://host/path`): relay to the origin and back.

Bodies stream both ways in the chunks they arrive in, with backpressure; the
response head reaches the client as soon as the origin sends it. A pooled
connection that turns out dead before any response byte is retried once on a
fresh one when the request is idempotent and has no body.
"""

from __future__ import annotations

import asyncio
import html

import httptools

from ..errors import BadGateway, BadRequest, DestinationDenied, GatewayTimeout, HttpError, RequestTimeout
from ..http.exchange import Exchange
from ..http.message import Headers, Request
from ..memo import memoized
from ..observability.metrics import GatewayMetrics
from ..policy.blocklist import BlocklistFile
from .dial import Dialer
from .headers import HOP_BY_HOP, end_to_end, without_named
from .upstream import ResponseHead, UpstreamClosed, UpstreamConnection, UpstreamPool

# After the first read timeout, an upload must have averaged at least this.
MIN_UPLOAD_RATE = 1024
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
VIA = (b"Via", b"1.1 proxygate")
# Besides the hop-by-hop ones, the headers we write ourselves.
_REQUEST_SKIP = HOP_BY_HOP | {b"host", b"expect", b"x-request-id", b"content-length"}


class Target:
    """The parsed authority and origin-form path of an absolute-form URL (not changed
    once made: `parse_target` hands the same one to every request for that URL)."""

    __slots__ = ("host", "port", "path", "authority")

    def __init__(self, raw: bytes) -> None:
        try:
            url = httptools.parse_url(raw)
        except httptools.HttpParserInvalidURLError:
            raise BadRequest("malformed request target") from None
        if url.schema is None or url.schema.lower() != b"http":
            scheme = (url.schema or b"").decode("latin-1")
            raise BadRequest(f"unsupported URL scheme {scheme!r}: use CONNECT for https")
        if not url.host:
            raise BadRequest("request target has no host")
        try:
            # A trailing dot names the same host (as in CONNECT): policy and dial see one spelling.
            self.host = url.host.decode("ascii").lower().rstrip(".")
        except UnicodeDecodeError:
            raise BadRequest("request target host is not ASCII") from None
        if not self.host:
            raise BadRequest("request target has no host")
        self.port: int = url.port or 80
        path = url.path or b"/"
        self.path = path + b"?" + url.query if url.query is not None else path
        # ord(":"), not b":": bytes `in` bytes builds and drops a TypeError in CPython.
        host_bytes = url.host if 58 not in url.host else b"[" + url.host + b"]"
        self.authority = host_bytes if self.port == 80 else host_bytes + b":%d" % self.port


@memoized
def parse_target(raw: bytes) -> Target:
    """`Target(raw)`, remembered (memo.py; a refusal is not: it raises). Clients ask
    for the same URLs again and again, and parsing one costs more than the memo's
    lookup by several thousand instructions."""
    return Target(raw)


def block_page(host: str) -> bytes:
    safe = html.escape(host)
    return (
        "<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head><body>"
        f"<h1>Access denied</h1><p>Requests to <b>{safe}</b> are blocked by this proxy's policy.</p>"
        "</body></html>\n"
    ).encode()


class ForwardProxy:
    """Answers absolute-form requests: the blocklist and the destination port, then the origin.

    Who may use the proxy and how often is decided before (the gateway's
    access and rate-limit policies); the destination address is checked by
    the dialer when it resolves the host.
    """

    def __init__(self, blocklist: BlocklistFile, dialer: Dialer, forwarder: Forwarder, metrics: GatewayMetrics) -> None:
        self.blocklist = blocklist
        self.dialer = dialer
        self.forwarder = forwarder
        self.metrics = metrics

    async def handle(self, req: Request, ex: Exchange, target: Target) -> None:
        if self.blocklist.current.is_blocked(target.host):
            self.metrics.blocked.inc()
            ex.send(403, [(b"Content-Type", b"text/html; charset=utf-8")], block_page(target.host))
            return
        if req.upgrade:
            # Protocol upgrades are not relayed: the request goes through as
            # plain HTTP, and the connection ends after it.
            ex.close_when_done()
        try:
            self.dialer.policy.check_http_port(target.port)
            await self.forwarder.forward(req, target, ex)
        except DestinationDenied:
            self.metrics.denied.labels("destination").inc()
            raise
        except HttpError as exc:
            self.metrics.upstream_errors.labels(str(exc.status)).inc()
            raise


class Forwarder:
    # Request headers not copied (besides hop-by-hop ones), and extra header
    # lines the request carries; the response header added on the way back.
    request_skip: frozenset[bytes] = frozenset(_REQUEST_SKIP)
    via: tuple[bytes, bytes] | None = VIA

    def __init__(self, pool: UpstreamPool, read_timeout: float) -> None:
        self.pool = pool
        self.read_timeout = read_timeout or None

    def extra_request_lines(self, req: Request) -> bytes:
        return b"Via: 1.1 proxygate\r\n"

    def request_head(self, req: Request, target: Target) -> bytes:
        headers = end_to_end(req.headers, skip=self.request_skip)
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (req.method.encode(), target.path, target.authority)]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")  # one join at the end: no bytes made per header
        if req.body is not None:
            if req.chunked or req.content_length is None:
                lines.append(b"Transfer-Encoding: chunked\r\n")
            else:
                lines.append(b"Content-Length: %d\r\n" % req.content_length)
        lines.append(self.extra_request_lines(req))
        lines.append(b"X-Request-ID: %s\r\n\r\n" % req.request_id.encode())
        return b"".join(lines)

    def response_headers(self, req: Request, head: ResponseHead) -> Headers:
        """The origin's end-to-end headers as the client gets them."""
        headers: Headers = without_named(head.headers, head.connection_named)
        if self.via is not None:
            headers.append(self.via)
        return headers

    async def forward(self, req: Request, target: Target, ex: Exchange) -> None:
        head_bytes = self.request_head(req, target)
        upstream, head = await self._exchange(req, target, head_bytes, ex)
        try:
            await self._relay_response(req, upstream, head, ex)
        finally:
            if upstream.complete and not ex.client_gone:
                self.pool.release(upstream)
            else:
                upstream.abort()

    async def _exchange(
        self, req: Request, target: Target, head_bytes: bytes, ex: Exchange
    ) -> tuple[UpstreamConnection, ResponseHead]:
        retryable = req.body is None and req.method in IDEMPOTENT
        for attempt in (0, 1):
            # The retry of a stale pooled connection dials: other pooled ones may be as stale.
            upstream = self.pool.idle(target.host, target.port) if attempt == 0 else None
            reused = upstream is not None
            if upstream is None:
                upstream = await self.pool.dial(target.host, target.port)
            try:
                response = upstream.begin(head_only=req.method == "HEAD")
                upstream.write(head_bytes)
                if req.body is not None:
                    await self._send_body(req, upstream, ex, response)
                if not response.done():
                    upstream.expect_head_within(self.read_timeout)
                    await response
                return upstream, response.result()
            except UpstreamClosed as exc:
                upstream.abort()
                if attempt == 0 and reused and retryable and not upstream.got_bytes:
                    continue  # the pooled connection was stale: one fresh try
                raise BadGateway(f"{exc} ({target.host}:{target.port})") from None
            except asyncio.TimeoutError:
                upstream.abort()
                raise GatewayTimeout(
                    f"{target.host}:{target.port} sent no response within {self.read_timeout:g}s"
                ) from None
            except BaseException:
                upstream.abort()
                raise
        raise AssertionError("unreachable")

    async def _send_body(
        self,
        req: Request,
        upstream: UpstreamConnection,
        ex: Exchange,
        response: asyncio.Future[ResponseHead],
    ) -> None:
        body = req.body
        assert body is not None
        chunked = req.chunked or req.content_length is None
        write_timeout = ex.settings.write_timeout
        loop = ex.conn.loop  # not asyncio.get_running_loop(): a getpid() system call on 3.11
        started = loop.time()
        while not response.done():
            try:
                data = await body.read(self.read_timeout)
            except asyncio.TimeoutError:
                raise RequestTimeout(f"request body stalled for {self.read_timeout:g}s") from None
            if not data:
                break
            elapsed = loop.time() - started
            if self.read_timeout and elapsed > self.read_timeout and body.received < MIN_UPLOAD_RATE * elapsed:
                # A byte every few seconds never trips the stall timeout; this does.
                raise RequestTimeout(f"request body arriving slower than {MIN_UPLOAD_RATE} bytes/s")
            upstream.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            await upstream.flow.drain(write_timeout)
        else:
            return  # the origin answered early; it will not read the rest
        if chunked:
            upstream.write(b"0\r\n\r\n")

    async def _relay_response(
        self, req: Request, upstream: UpstreamConnection, head: ResponseHead, ex: Exchange
    ) -> None:
        headers = self.response_headers(req, head)
        body = upstream.body
        assert body is not None
        no_body = req.method == "HEAD" or head.status in (204, 304)
        chunked = False
        close = False
        if no_body:
            pass
        elif head.content_length is not None and not head.chunked:
            pass  # Content-Length was kept
        elif req.version == b"1.1":
            chunked = True
            headers.append((b"Transfer-Encoding", b"chunked"))
        else:
            close = True  # an HTTP/1.0 client reads to the end of the connection
        out = ex.start_response(head.status, headers, close=close)
        if no_body:
            ex.write(out)
            return
        data = body.read_nowait()
        if body.complete:
            # The whole body came with the head (most small responses): one
            # write, no waiting on either side.
            if chunked:
                out += b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data) if data else b"0\r\n\r\n"
            else:
                out += data
            ex.write(out)
            return
        read_timeout = self.read_timeout
        while True:
            if data:
                out += b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
            elif body.at_eof:
                break
            if out:
                ex.write(out)
                out = b""
                await ex.drain()
            try:
                data = await body.read(read_timeout)
            except asyncio.TimeoutError:
                ex.cut_short(504)  # for the log and metrics: the client got a cut response
                raise GatewayTimeout("upstream stalled mid-response") from None
            except UpstreamClosed:
                ex.cut_short(502)  # an invalid chunk or a close mid-body is not a 200 in the log
                raise
            if not data:
                break
        if chunked:
            out += b"0\r\n\r\n"
        if out:
            ex.write(out)
