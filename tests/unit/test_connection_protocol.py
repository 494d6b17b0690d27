"""`ClientConnection` in-process: framing, order, limits and every timer, on a virtual clock.

The fake transport and clock are in tests/support/protocol.py; nothing here
opens a socket or sleeps, and each test takes milliseconds.
"""

from __future__ import annotations

import asyncio
import gc
import io
import socket

from proxygate.config import GatewaySettings
from proxygate.http.connection import MAX_PIPELINED, ClientConnection
from proxygate.http.exchange import Exchange
from proxygate.http.message import Request
from proxygate.inference.handoff import OwnerLoad
from proxygate.observability.logging import AccessLog
from proxygate.observability.metrics import GatewayMetrics
from proxygate.policy.blocklist import BlocklistFile
from proxygate.policy.destinations import DestinationPolicy
from proxygate.proxy.connect import ConnectHandler
from proxygate.proxy.forward import Forwarder, Target
from proxygate.proxy.tunnel import Tunnel
from proxygate.proxy.upstream import UpstreamConnection, UpstreamPool
from proxygate.wiring import build_gateway
from tests.support.protocol import App, FakeTransport, VirtualClock, connect, responses, run, settle

GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


def test_pipelined_requests_are_answered_in_order_whoever_finishes_first() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        release = asyncio.Event()

        async def slow(req: Request, ex: Exchange) -> None:
            await release.wait()
            ex.send(200, [], b"slow")

        app.routes[b"/slow"] = slow
        conn, t = connect(app)
        conn.data_received(GET % b"/slow" + GET % b"/a" + GET % b"/b")
        await settle()
        assert t.take() == b""  # /a and /b wait behind /slow
        release.set()
        await settle()
        assert [body for _, _, body in responses(t.take())] == [b"slow", b"ok /a", b"ok /b"]
        assert [target for _, target, _ in app.done] == [b"/slow", b"/a", b"/b"]

    run(test)


def test_too_many_pipelined_requests_pause_reading_until_the_queue_drains() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        release = asyncio.Event()

        async def slow(req: Request, ex: Exchange) -> None:
            await release.wait()
            ex.send(204, [])

        app.routes[b"/slow"] = slow
        conn, t = connect(app)
        conn.data_received(GET % b"/slow" + b"".join(GET % b"/n" for _ in range(MAX_PIPELINED + 1)))
        await settle()
        assert not t.reading
        release.set()
        await settle(20)
        assert t.reading and len(responses(t.take())) == MAX_PIPELINED + 2

    run(test)


def test_expect_100_continue_is_answered_only_when_the_handler_reads() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        start_reading = asyncio.Event()

        async def upload(req: Request, ex: Exchange) -> None:
            await start_reading.wait()
            assert req.body is not None
            data = b""
            while chunk := await req.body.read():
                data += chunk
            ex.send(200, [], data)

        app.routes[b"/up"] = upload
        conn, t = connect(app)
        conn.data_received(b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        await settle()
        assert t.take() == b""  # not yet: the handler may still refuse without reading
        start_reading.set()
        await settle()
        assert t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.data_received(b"hello")
        await settle()
        ((status, _, body),) = responses(t.take())
        assert (status, body) == (200, b"hello")

    run(test)


def test_a_chunked_upload_arrives_whole_across_any_split() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()

        async def echo(req: Request, ex: Exchange) -> None:
            assert req.body is not None
            data = b""
            while chunk := await req.body.read():
                data += chunk
            ex.send(200, [], data)

        app.routes[b"/echo"] = echo
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        wire = head + b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        for cut in range(1, len(wire)):
            conn, t = connect(app)
            conn.data_received(wire[:cut])
            await settle(2)
            conn.data_received(wire[cut:])
            await settle()
            ((status, _, body),) = responses(t.take())
            assert (status, body) == (200, b"hello world"), cut

    run(test)


def test_the_exchange_says_how_the_connection_goes_on_in_each_response() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()

        async def last(req: Request, ex: Exchange) -> None:
            ex.close_when_done()
            ex.send(200, [], b"bye")

        app.routes[b"/last"] = last
        conn, t = connect(app)
        # HTTP/1.0 asking for keep-alive gets it said back; HEAD gets the head, no body.
        conn.data_received(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        await settle()
        head, _, body = t.take().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 ") and b"\r\nConnection: keep-alive" in head and body == b"ok /a"
        conn.data_received(b"HEAD /b HTTP/1.1\r\nHost: x\r\n\r\n")
        await settle()
        head, _, body = t.take().partition(b"\r\n\r\n")
        assert b"\r\nContent-Length: 5\r\n" in head + b"\r\n" and body == b""
        # A handler ending the connection: `Connection: close`, then the close.
        conn.data_received(GET % b"/last")
        await settle()
        ((status, headers, body),) = responses(t.take())
        assert (status, headers[b"connection"], body) == (200, b"close", b"bye")
        assert t.closed
        assert app.done == [("GET", b"/a", 200), ("HEAD", b"/b", 200), ("GET", b"/last", 200)]

    run(test)


def test_a_response_cut_short_is_logged_with_the_status_the_handler_gives() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()

        async def cut(req: Request, ex: Exchange) -> None:
            ex.write(ex.start_response(200, [(b"Transfer-Encoding", b"chunked")]) + b"3\r\nabc\r\n")
            ex.cut_short(502)
            raise ConnectionResetError("the origin went away mid-body")

        app.routes[b"/cut"] = cut
        conn, t = connect(app)
        conn.data_received(GET % b"/cut")
        await settle()
        assert not t.take().endswith(b"0\r\n\r\n") and t.aborted  # never a last chunk: the client sees the cut
        assert app.done == [("GET", b"/cut", 502)]

    run(test)


def test_half_close_after_pipelined_requests_answers_them_all_then_closes() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        conn, t = connect(app)
        conn.data_received(GET % b"/a" + GET % b"/b")
        assert conn.eof_received() is True  # keep our side open to answer
        await settle()
        answers = responses(t.take())
        assert [body for _, _, body in answers] == [b"ok /a", b"ok /b"]
        assert answers[-1][1][b"connection"] == b"close" and t.closed

    run(test)


def test_half_close_while_idle_closes_at_once() -> None:
    async def test(clock: VirtualClock) -> None:
        conn, t = connect(App())
        assert conn.eof_received() is None  # the transport closes itself

    run(test)


def test_an_oversized_head_is_a_431_and_closes() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App(max_header_size=1024)
        conn, t = connect(app)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
        await settle()
        ((status, headers, _),) = responses(t.take())
        assert status == 431 and headers[b"connection"] == b"close" and t.closed

    run(test)


def test_a_parse_error_is_answered_after_the_requests_before_it() -> None:
    async def test(clock: VirtualClock) -> None:
        conn, t = connect(App())
        conn.data_received(GET % b"/a" + b"GET /b HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        await settle()
        answers = responses(t.take())
        assert [status for status, _, _ in answers] == [200, 400] and t.closed

    run(test)


def test_read_timeout_on_a_partial_head_is_a_408_at_exactly_read_timeout() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App(read_timeout=30.0)
        conn, t = connect(app)
        start = clock.now
        conn.data_received(b"GET / HTTP/1.1\r\nHo")
        while not t.closed:
            await asyncio.sleep(1)  # virtual: one second per turn
        ((status, _, _),) = responses(t.take())
        assert status == 408 and 30.0 <= clock.now - start <= 31.0

    run(test)


def test_a_first_head_is_due_within_read_timeout_of_the_accept_a_later_one_of_its_first_byte() -> None:
    """The first request's head shares the deadline armed when the connection opened (a
    client dribbling it costs no second timer); a kept-alive connection's next head gets
    the whole read timeout from its first byte."""

    async def test(clock: VirtualClock) -> None:
        conn, t = connect(App(read_timeout=30.0, idle_timeout=120.0))
        opened = clock.now
        await asyncio.sleep(20)
        conn.data_received(b"GET /a HTTP/1.1\r\nHo")
        while not t.closed:
            await asyncio.sleep(1)
        ((status, _, _),) = responses(t.take())
        assert status == 408 and 30.0 <= clock.now - opened <= 31.0

        conn, t = connect(App(read_timeout=30.0, idle_timeout=120.0))
        conn.data_received(GET % b"/a")
        await settle()
        assert responses(t.take())[0][0] == 200
        await asyncio.sleep(20)
        started = clock.now
        conn.data_received(b"GET /b HTTP/1.1\r\nHo")
        while not t.closed:
            await asyncio.sleep(1)
        ((status, _, _),) = responses(t.take())
        assert status == 408 and 30.0 <= clock.now - started <= 31.0

    run(test)


def test_a_connection_that_never_sends_is_closed_silently_after_read_timeout() -> None:
    async def test(clock: VirtualClock) -> None:
        conn, t = connect(App(read_timeout=30.0))
        start = clock.now
        while not t.closed:
            await asyncio.sleep(1)
        assert t.take() == b"" and 30.0 <= clock.now - start <= 31.0

    run(test)


def test_idle_keep_alive_connection_closes_after_idle_timeout_not_read_timeout() -> None:
    async def test(clock: VirtualClock) -> None:
        conn, t = connect(App(read_timeout=5.0, idle_timeout=120.0))
        conn.data_received(GET % b"/a")
        await settle()
        assert responses(t.take())[0][0] == 200
        served = clock.now
        while not t.closed:
            await asyncio.sleep(1)
        assert 120.0 <= clock.now - served <= 121.0

    run(test)


def test_a_stalled_write_is_cut_after_write_timeout_a_slow_one_is_not() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App(write_timeout=60.0)
        finished = asyncio.Event()

        async def stream(req: Request, ex: Exchange) -> None:
            ex.write(ex.start_response(200, [(b"Transfer-Encoding", b"chunked")]))
            try:
                for _ in range(3):
                    ex.write(b"1\r\nx\r\n")
                    await ex.drain()
                ex.write(b"0\r\n\r\n")
            finally:
                finished.set()

        app.routes[b"/stream"] = stream
        conn, t = connect(app)
        conn.pause_writing()  # the client's buffer is full
        conn.data_received(GET % b"/stream")
        start = clock.now
        await asyncio.sleep(50)
        conn.resume_writing()  # it read a little after 50 s: slow, not stalled ...
        conn.pause_writing()  # ... and is full again: the next chunk waits a fresh write timeout
        await finished.wait()
        assert t.aborted and 110.0 <= clock.now - start <= 111.0  # 50 s, then 60 s stalled

    run(test)


def test_shutdown_closes_idle_connections_now_and_busy_ones_after_their_request() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        release = asyncio.Event()

        async def slow(req: Request, ex: Exchange) -> None:
            await release.wait()
            ex.send(200, [], b"done")

        app.routes[b"/slow"] = slow
        idle, t_idle = connect(app)
        busy, t_busy = connect(app)
        busy.data_received(GET % b"/slow")
        await settle()
        idle.shutdown()
        busy.shutdown()
        assert t_idle.closed and not t_busy.closed
        release.set()
        await settle()
        ((status, headers, body),) = responses(t_busy.take())
        assert (status, body) == (200, b"done") and headers[b"connection"] == b"close" and t_busy.closed
        await settle()
        assert app.open == 0

    run(test)


def test_a_request_sent_but_not_read_when_shutdown_comes_is_answered() -> None:
    """A stop under load finds connections whose request waits in the socket, unread
    (just accepted, or taken from the accept queue): not idle, they are answered."""

    async def test(clock: VirtualClock) -> None:
        app = App()
        fresh, t = connect(app)
        ours, client = socket.socketpair()
        with ours, client:
            t.sock = ours
            client.sendall(GET % b"/late")  # in the socket; the loop has not delivered it yet
            fresh.shutdown()
            assert not t.closed
            fresh.data_received(ours.recv(1024))
            await settle()
        ((status, headers, body),) = responses(t.take())
        assert (status, body) == (200, b"ok /late") and headers[b"connection"] == b"close" and t.closed

    run(test)


def test_a_handed_over_connection_arriving_while_the_gateway_drains_is_answered() -> None:
    """A connection a sibling process passed with its request read (the preface) reaches a
    draining gateway: the request is answered, then the connection closes."""

    async def test(clock: VirtualClock) -> None:
        gateway = build_gateway(GatewaySettings(), access_log=AccessLog("json", stream=io.StringIO()))
        gateway.lifecycle.shutting_down = True
        conn = ClientConnection(gateway, preface=GET % b"/healthz")  # type: ignore[arg-type]
        t = FakeTransport()
        t.protocol = conn
        conn.connection_made(t)  # type: ignore[arg-type]
        await settle()
        ((status, headers, _),) = responses(t.take())
        assert status == 200 and headers[b"connection"] == b"close" and t.closed

    run(test)


def test_a_connection_opened_after_the_stop_began_waits_for_its_first_request() -> None:
    """Opened while the gateway drains (taken from the accept queue, its TLS handshake
    ending), its client connected before the stop: the first request is waited for and
    answered; one that never comes ends at the read timeout."""

    async def test(clock: VirtualClock) -> None:
        gateway = build_gateway(GatewaySettings(read_timeout=5.0), access_log=AccessLog("json", stream=io.StringIO()))
        gateway.begin_shutdown()
        late, t_late = connect(gateway)  # type: ignore[arg-type]
        silent, t_silent = connect(gateway)  # type: ignore[arg-type]
        await asyncio.sleep(1)
        assert not t_late.closed and not t_silent.closed
        late.data_received(GET % b"/healthz")
        await settle()
        ((status, headers, _),) = responses(t_late.take())
        assert status == 200 and headers[b"connection"] == b"close" and t_late.closed
        opened = clock.now - 1
        await gateway.drain_connections(timeout=30)
        assert t_silent.closed and 5.0 <= clock.now - opened <= 6.0

    run(test)


def test_a_client_that_leaves_cancels_its_handler() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        cancelled = asyncio.Event()

        async def forever(req: Request, ex: Exchange) -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise

        app.routes[b"/forever"] = forever
        conn, t = connect(app)
        conn.data_received(GET % b"/forever")
        await settle()
        conn.connection_lost(None)
        await settle()
        assert cancelled.is_set() and app.done == [("GET", b"/forever", 0)] and app.open == 0

    run(test)


# ---- forwarding through the upstream pool, the test playing the origin ---------------------


class FakeOrigin:
    """Opens fake upstream connections; each one's requests and the responses fed to it are the test's."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.opened: list[tuple[FakeTransport, UpstreamConnection]] = []
        self.greeting = greeting  # what each connection says first, on the loop's next pass

    async def open(self, host: str, port: int, factory, loop=None):  # type: ignore[no-untyped-def]
        upstream = factory()
        transport = FakeTransport()
        transport.protocol = upstream
        upstream.connection_made(transport)
        if self.greeting:
            asyncio.get_running_loop().call_soon(upstream.data_received, self.greeting)
        self.opened.append((transport, upstream))
        return transport, upstream


def forwarding_app(origin: FakeOrigin) -> App:
    app = App()
    forwarder = Forwarder(UpstreamPool(origin, 4, 60.0, app.writes), read_timeout=30.0)

    async def handle(req: Request, ex: Exchange) -> None:
        await forwarder.forward(req, Target(req.target), ex)

    app.handle = handle  # type: ignore[method-assign]
    return app


async def answer(transport: FakeTransport, upstream: UpstreamConnection, body: bytes) -> bytes:
    """Wait for a request on an upstream connection, answer it; the request's bytes."""
    while not transport.out:
        await asyncio.sleep(0)
    request = transport.take()
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    return request


def test_upstream_connections_are_reused_between_requests() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        conn, t = connect(forwarding_app(origin))
        for i in range(3):
            conn.data_received(b"GET http://o.test/%d HTTP/1.1\r\nHost: o.test\r\n\r\n" % i)
            await settle()
            transport, upstream = origin.opened[-1]
            assert (await answer(transport, upstream, b"r%d" % i)).startswith(b"GET /%d HTTP/1.1\r\n" % i)
            await settle()
            ((status, _, body),) = responses(t.take())
            assert (status, body) == (200, b"r%d" % i)
        assert len(origin.opened) == 1  # one upstream connection served all three

    run(test)


def test_a_head_response_does_not_desynchronise_the_next_response_on_the_pooled_connection() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        conn, t = connect(forwarding_app(origin))
        answers = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",  # HEAD: the 5000 bytes never come
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nthree",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfour",
        ]
        for method, answer in zip(("GET", "HEAD", "GET", "GET"), answers, strict=True):
            conn.data_received(b"%s http://o.test/ HTTP/1.1\r\nHost: o.test\r\n\r\n" % method.encode())
            await settle()
            transport, upstream = origin.opened[-1]
            assert transport.take().startswith(method.encode() + b" / HTTP/1.1")
            upstream.data_received(answer)
            await settle()
            out = t.take()
            if method == "HEAD":
                assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"\r\n\r\n")  # a head, no body
            else:
                ((status, _, body),) = responses(out)
                assert (status, body) == (200, answer.rpartition(b"\r\n\r\n")[2])
        assert len(origin.opened) == 1  # one upstream connection served all four

    run(test)


def test_a_pooled_connection_the_origin_closed_is_retried_once_on_a_fresh_one() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        conn, t = connect(forwarding_app(origin))
        conn.data_received(b"GET http://o.test/a HTTP/1.1\r\nHost: o.test\r\n\r\n")
        await settle()
        await answer(*origin.opened[0], b"first")
        await settle()
        t.take()
        # The second request goes out on the pooled connection, which the origin
        # had already closed: nothing comes back but EOF.
        conn.data_received(b"GET http://o.test/b HTTP/1.1\r\nHost: o.test\r\n\r\n")
        await settle()
        stale_transport, stale = origin.opened[0]
        assert stale_transport.take().startswith(b"GET /b ")
        stale.eof_received()
        await settle()
        assert len(origin.opened) == 2  # a fresh connection, same request
        assert (await answer(*origin.opened[1], b"second")).startswith(b"GET /b ")
        await settle()
        ((status, _, body),) = responses(t.take())
        assert (status, body) == (200, b"second")

    run(test)


def test_the_retry_after_a_stale_pooled_connection_dials_even_if_more_are_pooled() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        app = forwarding_app(origin)
        # Two requests at once: two upstream connections, both pooled afterwards.
        clients = [connect(app) for _ in range(2)]
        for conn, _ in clients:
            conn.data_received(b"GET http://o.test/a HTTP/1.1\r\nHost: o.test\r\n\r\n")
        await settle()
        assert len(origin.opened) == 2
        for transport, upstream in origin.opened:
            await answer(transport, upstream, b"first")
        await settle()
        # The origin restarted meanwhile: every pooled connection is stale.
        conn, t = clients[0]
        t.take()
        conn.data_received(b"GET http://o.test/b HTTP/1.1\r\nHost: o.test\r\n\r\n")
        await settle()
        stale = [(tr, up) for tr, up in origin.opened if tr.out]
        assert len(stale) == 1 and stale[0][0].take().startswith(b"GET /b ")
        stale[0][1].eof_received()
        await settle()
        assert len(origin.opened) == 3  # the retry dialled, not the other pooled one
        assert (await answer(*origin.opened[2], b"second")).startswith(b"GET /b ")
        await settle()
        ((status, _, body),) = responses(t.take())
        assert (status, body) == (200, b"second")

    run(test)


def test_an_origin_silent_after_the_request_is_a_504_read_timeout_after_that_request() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        conn, t = connect(forwarding_app(origin))  # read_timeout 30 s
        conn.data_received(b"GET http://o.test/a HTTP/1.1\r\nHost: o.test\r\n\r\n")
        await settle()
        transport, upstream = origin.opened[0]
        transport.take()
        await asyncio.sleep(29)  # virtual: just inside the limit
        upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await settle()
        assert [status for status, _, _ in responses(t.take())] == [200]
        await asyncio.sleep(20)
        # The second request on the same pooled connection gets its own 30 s,
        # counted from when it was sent (the first one's deadline has moved).
        sent = clock.now
        conn.data_received(b"GET http://o.test/b HTTP/1.1\r\nHost: o.test\r\n\r\n")
        await settle()
        assert transport.take().startswith(b"GET /b ")
        for _ in range(40):
            if t.out:
                break
            await asyncio.sleep(1)
        ((status, _, body),) = responses(t.take())
        assert status == 504 and b"sent no response within 30s" in body
        assert 30.0 <= clock.now - sent <= 31.0
        assert upstream.closed and len(origin.opened) == 1  # the silent connection is not pooled again

    run(test)


# ---- CONNECT: the socket leaves HTTP for the tunnel ------------------------------------


def tunnel_app(origin: FakeOrigin, metrics: GatewayMetrics | None = None) -> tuple[App, list[Exchange]]:
    app = App()
    origin.policy = DestinationPolicy.from_settings(app.settings)  # type: ignore[attr-defined]
    metrics = metrics or GatewayMetrics()
    handler = ConnectHandler(BlocklistFile(""), origin, metrics, idle_timeout=60.0)  # type: ignore[arg-type]
    exchanges: list[Exchange] = []

    async def handle(req: Request, ex: Exchange) -> None:
        exchanges.append(ex)
        await handler.handle(req, ex, "o.test", 443)

    app.handle = handle  # type: ignore[method-assign]
    return app, exchanges


def test_a_tunnel_relays_both_ways_half_closes_and_logs_the_bytes_it_carried() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        app, exchanges = tunnel_app(origin)
        tasks = len(asyncio.all_tasks())
        conn, t = connect(app)
        # Bytes after the head in the same packet (a TLS ClientHello, say) are the tunnel's.
        conn.data_received(b"CONNECT o.test:443 HTTP/1.1\r\nHost: o.test:443\r\n\r\nhello")
        await settle()
        assert t.take().startswith(b"HTTP/1.1 200 Connection established\r\n")
        up_t, up = origin.opened[0]
        assert up_t.take() == b"hello"
        client_side = t.protocol
        assert client_side is not conn and isinstance(client_side, asyncio.Protocol)  # no HTTP parsing any more
        # No task waits out the tunnel's life; its request is open (busy) until it ends.
        assert len(asyncio.all_tasks()) == tasks
        assert conn.busy and app.done == []
        client_side.data_received(b"GET / HTTP/1.1\r\n\r\n")  # relayed as bytes, not parsed
        assert up_t.take() == b"GET / HTTP/1.1\r\n\r\n"
        up.data_received(b"world")
        await settle()
        assert t.take() == b"world"
        assert client_side.eof_received() is True  # the client is done sending: half-close upstream
        assert up_t.eof_written and not t.closed
        up.data_received(b"!")
        await settle()
        assert t.take() == b"!"  # the other direction still flows
        up.eof_received()
        await settle()
        assert t.closed and app.done == [("CONNECT", b"o.test:443", 200)]
        assert (exchanges[0].bytes_in, exchanges[0].bytes_out) == (len(b"hello") + 18, len(b"world!"))
        assert app.open == 0 and not conn.busy

    run(test)


def test_what_the_origin_says_first_follows_the_200() -> None:
    """An origin that speaks first (SMTP, SSH) may send before the loop pass that wrote the
    200 has ended; the tunnel writes upstream bytes at once, so the 200 must be out first."""

    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin(greeting=b"220 ready\r\n")
        app, _ = tunnel_app(origin)
        conn, t = connect(app)
        conn.data_received(b"CONNECT o.test:25 HTTP/1.1\r\nHost: o.test:25\r\n\r\n")
        await settle()
        head, _, rest = t.take().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 Connection established") and rest == b"220 ready\r\n"

    run(test)


def test_a_tunnel_closes_after_the_idle_timeout_counted_from_its_last_bytes() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        metrics = GatewayMetrics()
        app, _ = tunnel_app(origin, metrics)  # idle timeout 60 s
        conn, t = connect(app)
        conn.data_received(b"CONNECT o.test:443 HTTP/1.1\r\nHost: o.test:443\r\n\r\n")
        await settle()
        opened = clock.now
        up_t, up = origin.opened[0]
        await asyncio.sleep(40)
        up.data_received(b"still here")  # bytes one way move the deadline: 60 s from now
        last = clock.now
        await asyncio.sleep(55)
        assert not t.closed and not up_t.closed, "closed before 60 s without bytes"
        assert t.take().endswith(b"still here")
        for _ in range(20):
            if t.closed:
                break
            await asyncio.sleep(1)
        assert t.closed and up_t.closed
        assert 60.0 <= clock.now - last <= 61.0 and clock.now - opened > 60.0
        await settle()
        tunnels = metrics.connection_stats.tunnels
        assert tunnels.get("idle_timeout") == 1 and not tunnels.get("closed")
        assert app.done == [("CONNECT", b"o.test:443", 200)] and app.open == 0

    run(test)


def test_a_tunnel_ends_when_the_client_leaves_and_shutdown_waits_for_it() -> None:
    async def test(clock: VirtualClock) -> None:
        origin = FakeOrigin()
        app, _ = tunnel_app(origin)
        conn, t = connect(app)
        conn.data_received(b"CONNECT o.test:443 HTTP/1.1\r\nHost: o.test:443\r\n\r\n")
        await settle()
        conn.shutdown()  # a tunnel is busy: shutdown lets it run
        assert not t.closed and conn.busy
        up_t, _ = origin.opened[0]
        t.close()  # the client goes away
        await settle()
        assert up_t.closed and app.done == [("CONNECT", b"o.test:443", 200)] and app.open == 0

    run(test)


def test_finished_connections_and_tunnels_leave_no_cycles_for_the_garbage_collector() -> None:
    """Freed by reference counts the moment they end. A cycle (the parser and the connection
    whose methods are its callbacks, a deadline and its owner, a tunnel and its upstream
    side) would leave each connection, and all it holds, to the cyclic collector, which
    walks whatever is alive to find them (bench/RESULTS.md: 4 % of a new connection's
    instructions)."""

    async def test(clock: VirtualClock) -> None:
        app = App()
        conn, t = connect(app)
        conn.data_received(b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await settle()
        assert t.closed
        origin = FakeOrigin()
        app, exchanges = tunnel_app(origin)
        conn, t = connect(app)
        conn.data_received(b"CONNECT o.test:443 HTTP/1.1\r\nHost: o.test:443\r\n\r\n")
        await settle()
        origin.opened[0][1].eof_received()  # the origin closes: the tunnel ends
        t.protocol.eof_received()  # type: ignore[union-attr]
        await settle()
        assert t.closed and app.open == 0
        exchanges.clear()  # the test's own holds on the connection and the tunnel
        origin.opened.clear()
        del conn, t, origin, app, exchanges

    def ours_alive() -> set[int]:
        # type(), not isinstance(): that may ask an object its __class__, which some (torch's) warn about.
        return {id(o) for o in gc.get_objects() if type(o) in (ClientConnection, Tunnel)}

    gc.collect()
    before = ours_alive()  # whatever other tests in this process still hold
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds unreachable stays in gc.garbage
    try:
        run(test)
        gc.collect()
        cyclic = {type(o).__name__ for o in gc.garbage}
        alive = ours_alive() - before - {id(o) for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    ours = {"ClientConnection", "HttpRequestParser", "Deadline", "Tunnel", "UpstreamSide"}
    assert not cyclic & ours, f"left to the cyclic collector: {sorted(cyclic & ours)}"
    assert not alive, "a connection or tunnel of this test is still referenced"


def test_gateway_shutdown_ends_when_its_last_connection_closes_not_at_its_timeout() -> None:
    async def test(clock: VirtualClock) -> None:
        gateway = build_gateway(GatewaySettings(), access_log=AccessLog("json", stream=io.StringIO()))
        _, t = connect(gateway)  # type: ignore[arg-type]
        started = clock.now
        aborted = await gateway.drain_connections(timeout=30)
        assert aborted == 0 and t.closed and not gateway.connections
        assert clock.now - started < 30, "shutdown waited out its timeout after the last connection had closed"

    run(test)


def test_a_saturated_owner_ends_a_kept_alive_connection_with_connection_close(tmp_path) -> None:
    """`--workers N`, process 0 saturated with more connections than --spread-above: one
    response says `Connection: close` and the connection ends; the next within SHED_EVERY
    keeps its connection (at most one connection per interval)."""

    async def test(clock: VirtualClock) -> None:
        load = OwnerLoad(2)
        gateway = build_gateway(
            GatewaySettings(blocklist=str(tmp_path / "none.json"), spread_above=1, deny_destinations=()),
            access_log=AccessLog("json", stream=io.StringIO()),
            owner_load=load,
        )
        origin = FakeOrigin()
        gateway.pool.dialer = origin  # type: ignore[assignment]
        (a, a_t), (b, b_t) = connect(gateway), connect(gateway)  # type: ignore[arg-type]
        load.publish_busy(0.95)
        out = []
        for conn, t in ((a, a_t), (b, b_t)):
            conn.data_received(b"GET http://o.test/ HTTP/1.1\r\nHost: o.test\r\n\r\n")
            await settle()
            await answer(*origin.opened[-1], b"ok")
            await settle()
            ((status, headers, body),) = responses(t.take())
            out.append((status, headers.get(b"connection"), body, t.closed))
        assert out == [(200, b"close", b"ok", True), (200, None, b"ok", False)]
        assert gateway.connection_stats.shed == 1

    run(test)
