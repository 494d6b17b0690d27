"""`ClientConnection` in-process: framing, order, limits and every timer, on a virtual clock.

The fake transport and clock are in tests/support/protocol.py; nothing here
opens a socket or sleeps, and each test takes milliseconds.
"""

from __future__ import annotations

import asyncio

from proxygate.http.connection import MAX_PIPELINED, ClientConnection
from proxygate.http.message import Request
from tests.support.protocol import App, VirtualClock, connect, responses, run, settle

GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


def test_pipelined_requests_are_answered_in_order_whoever_finishes_first() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        release = asyncio.Event()

        async def slow(req: Request, conn: ClientConnection) -> None:
            await release.wait()
            conn.send(200, [], b"slow")

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

        async def slow(req: Request, conn: ClientConnection) -> None:
            await release.wait()
            conn.send(204, [])

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

        async def upload(req: Request, conn: ClientConnection) -> None:
            await start_reading.wait()
            assert req.body is not None
            data = b""
            while chunk := await req.body.read():
                data += chunk
            conn.send(200, [], data)

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

        async def echo(req: Request, conn: ClientConnection) -> None:
            assert req.body is not None
            data = b""
            while chunk := await req.body.read():
                data += chunk
            conn.send(200, [], data)

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

        async def stream(req: Request, conn: ClientConnection) -> None:
            conn.write(conn.start_response(200, [(b"Transfer-Encoding", b"chunked")]))
            try:
                for _ in range(3):
                    conn.write(b"1\r\nx\r\n")
                    await conn.drain()
                conn.write(b"0\r\n\r\n")
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

        async def slow(req: Request, conn: ClientConnection) -> None:
            await release.wait()
            conn.send(200, [], b"done")

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


def test_a_client_that_leaves_cancels_its_handler() -> None:
    async def test(clock: VirtualClock) -> None:
        app = App()
        cancelled = asyncio.Event()

        async def forever(req: Request, conn: ClientConnection) -> None:
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
