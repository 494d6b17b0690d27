"""The gateway's gRPC client (`rpc.channel`) against a real grpcio server.

The server runs in the test's event loop on 127.0.0.1:0 with raw-bytes
handlers, so each test can make it answer as it needs: many or large
messages, a large request, an error status, a call that waits until it is
cancelled, a server that goes away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest

from proxygate.rpc.channel import Call, Channel, RpcError


class Handlers:
    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def stream(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        count, size = (int(x) for x in request.split(b":"))
        for i in range(count):
            yield i.to_bytes(4, "big") * (size // 4)

    async def size(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(len(request)).encode()

    async def fail(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad request: 100% wrong")
        return b""

    async def wait(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        yield b"first"
        self.started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        yield b"never"


async def start_server(handlers: Handlers, port: int = 0) -> tuple[grpc.aio.Server, int]:
    def same(b: bytes) -> bytes:
        return b

    generic = grpc.method_handlers_generic_handler(
        "t.T",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(handlers.stream, same, same),
            "Size": grpc.unary_unary_rpc_method_handler(handlers.size, same, same),
            "Fail": grpc.unary_unary_rpc_method_handler(handlers.fail, same, same),
            "Wait": grpc.unary_stream_rpc_method_handler(handlers.wait, same, same),
        },
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)])
    server.add_generic_rpc_handlers((generic,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, bound


def run(test: Callable[[Channel, Handlers, grpc.aio.Server, int], Awaitable[None]]) -> None:
    async def main() -> None:
        handlers = Handlers()
        server, port = await start_server(handlers)
        channel = Channel(f"127.0.0.1:{port}")
        try:
            await asyncio.wait_for(test(channel, handlers, server, port), 30)
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(main())


def stream(channel: Channel, count: int, size: int, timeout: float = 10) -> Call[bytes]:
    return channel.unary_stream("/t.T/Stream", b"%d:%d" % (count, size), bytes, timeout)


def test_many_small_and_a_few_large_messages_arrive_whole_and_in_order() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        small = [m async for m in stream(channel, 500, 40)]
        assert small == [i.to_bytes(4, "big") * 10 for i in range(500)]
        # 4 MB in all: more than a stream's window, so reading must give window back.
        large = [m async for m in stream(channel, 40, 100_000)]
        assert [len(m) for m in large] == [100_000] * 40
        assert large[39] == (39).to_bytes(4, "big") * 25_000

    run(test)


def test_a_request_larger_than_the_servers_windows_is_sent_whole() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        answer = await channel.unary_unary("/t.T/Size", b"p" * 3_000_000, bytes, 10)
        assert answer == b"3000000"

    run(test)


def test_concurrent_calls_share_the_connection() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        async def one(n: int) -> int:
            return len([m async for m in stream(channel, n, 8)])

        assert await asyncio.gather(*(one(n) for n in range(1, 65))) == list(range(1, 65))

    run(test)


def test_an_error_status_and_an_unknown_method() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        with pytest.raises(RpcError) as failed:
            await channel.unary_unary("/t.T/Fail", b"", bytes, 5)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert failed.value.details() == "bad request: 100% wrong"
        with pytest.raises(RpcError) as unknown:
            await channel.unary_unary("/t.T/Nope", b"", bytes, 5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(test)


def test_cancel_reaches_the_server() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        call = channel.unary_stream("/t.T/Wait", b"", bytes, 30)
        assert await call.__anext__() == b"first"
        await handlers.started.wait()
        call.cancel()
        await handlers.cancelled.wait()
        with pytest.raises(asyncio.CancelledError):
            await call.__anext__()

    run(test)


def test_the_deadline_ends_the_call_here_and_at_the_server() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        call = channel.unary_stream("/t.T/Wait", b"", bytes, 0.5)
        with pytest.raises(RpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await handlers.cancelled.wait()

    run(test)


def test_nobody_listening_is_unavailable() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        await server.stop(None)
        with pytest.raises(RpcError) as info:
            await channel.unary_unary("/t.T/Size", b"", bytes, 5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    run(test)


def test_a_server_that_stops_fails_its_calls_and_a_new_one_is_reached_again() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        call = channel.unary_stream("/t.T/Wait", b"", bytes, 30)
        assert await call.__anext__() == b"first"
        await server.stop(None)
        with pytest.raises(RpcError) as info:
            await call.__anext__()
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        again, _ = await start_server(Handlers(), port)
        try:
            assert await channel.unary_unary("/t.T/Size", b"abc", bytes, 5) == b"3"
        finally:
            await again.stop(None)

    run(test)


def test_a_probe_answered_keeps_the_connection() -> None:
    async def test(channel: Channel, handlers: Handlers, server: grpc.aio.Server, port: int) -> None:
        assert await channel.unary_unary("/t.T/Size", b"ab", bytes, 5) == b"2"
        conn = channel._conn
        assert conn is not None
        channel.probe(30)
        assert conn._ping is not None
        while conn._ping is not None:  # the PING's answer disarms the probe's timer
            await asyncio.sleep(0.01)
        assert channel._conn is conn and not conn.closed
        assert await channel.unary_unary("/t.T/Size", b"abc", bytes, 5) == b"3"

    run(test)


def test_a_silent_peer_is_dropped_when_a_probe_goes_unanswered() -> None:
    async def main() -> None:
        async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while await reader.read(65536):
                pass  # reads everything, answers nothing: a host gone quiet
            writer.close()

        silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
        port = silent.sockets[0].getsockname()[1]
        channel = Channel(f"127.0.0.1:{port}")
        try:
            call = channel.unary_stream("/t.T/Wait", b"", bytes, 30)
            while channel._conn is None:  # connected (the call went out on it)
                await asyncio.sleep(0.01)
            channel.probe(0.05)
            with pytest.raises(RpcError) as info:
                await asyncio.wait_for(call.__anext__(), 10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "PING" in info.value.details()
        finally:
            await channel.close()
            silent.close()

    asyncio.run(main())
