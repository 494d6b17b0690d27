"""The gateway's gRPC client connection against a scripted peer: frames in, frames out.

A fake transport records what the client writes; the test plays the server
with `frames` helpers and an HPACK encoder. What a grpcio server rarely or
never does (padding, CONTINUATION, REFUSED_STREAM, GOAWAY mid-call, tiny
windows) is covered here; tests/integration/test_rpc_channel.py runs the
same client against a real grpcio server.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from hpack import Decoder, Encoder

from proxygate.rpc import frames as f
from proxygate.rpc.channel import Call, Channel, Connection, RpcError


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Peer:
    """The server's side of one connection, driven by the test."""

    def __init__(self) -> None:
        self.channel = Channel("127.0.0.1:1")
        self.transport = FakeTransport()
        self.conn = Connection(self.channel)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]
        self.channel._conn = self.conn  # calls open on this connection
        self.encoder = Encoder()
        self._reader = f.FrameReader(max_frame=1 << 24)
        self._decoder = Decoder()
        assert self.transport.written.startswith(f.PREFACE)
        del self.transport.written[: len(f.PREFACE)]

    def sent(self) -> list[f.Frame]:
        """Frames the client wrote since the last look."""
        data = bytes(self.transport.written)
        self.transport.written.clear()
        return self._reader.feed(data)

    def send(self, *frames: bytes) -> None:
        self.conn.data_received(b"".join(frames))

    def headers(self, stream: int, fields: list[tuple[str, str]], flags: int = f.END_HEADERS) -> bytes:
        return f.frame(f.HEADERS, flags, stream, self.encoder.encode(fields))

    def response_head(self, stream: int) -> bytes:
        return self.headers(stream, [(":status", "200"), ("content-type", "application/grpc")])

    def trailers(self, stream: int, status: int = 0, message: str = "") -> bytes:
        fields = [("grpc-status", str(status))] + ([("grpc-message", message)] if message else [])
        return self.headers(stream, fields, f.END_HEADERS | f.END_STREAM)

    def request_headers(self, fr: f.Frame) -> dict[str, str]:
        return dict(self._decoder.decode(fr.payload))  # type: ignore[arg-type]


def message(body: bytes, stream: int, flags: int = 0) -> bytes:
    return f.frame(f.DATA, flags, stream, f.grpc_message(body))


def run(test: Callable[[Peer], Awaitable[None]]) -> None:
    async def main() -> None:
        await test(Peer())

    asyncio.run(main())


def call(peer: Peer, request: bytes = b"req", timeout: float = 5.0) -> Call[bytes]:
    return peer.channel.unary_stream("/t.T/M", request, bytes, timeout)


async def drain(c: Call[Any]) -> list[Any]:
    return [m async for m in c]


def test_a_call_sends_headers_and_its_request_and_reads_messages_then_ok() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer, b"hello")
        head, data = [fr for fr in peer.sent() if fr.kind in (f.HEADERS, f.DATA)]
        fields = peer.request_headers(head)
        assert fields[":method"] == "POST" and fields[":path"] == "/t.T/M"
        assert fields["content-type"] == "application/grpc" and fields["te"] == "trailers"
        assert fields["grpc-timeout"].endswith("u") or fields["grpc-timeout"].endswith("m")
        assert data.flags & f.END_STREAM and data.payload == f.grpc_message(b"hello")
        # Two messages in one frame, a third split across two frames.
        third = f.grpc_message(b"three")
        peer.send(
            peer.response_head(1),
            f.frame(f.DATA, 0, 1, f.grpc_message(b"one") + f.grpc_message(b"two") + third[:4]),
            f.frame(f.DATA, 0, 1, third[4:]),
            peer.trailers(1),
        )
        assert await drain(c) == [b"one", b"two", b"three"]
        assert peer.conn.streams == {}

    run(test)


def test_padding_priority_and_continuation_are_understood() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer)
        peer.sent()
        block = peer.encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
        padded = bytes([3]) + b"\x00\x00\x00\x01\x10" + block[:2]  # pad length, priority fields, a fragment
        peer.send(
            f.frame(f.HEADERS, f.PADDED | f.PRIORITY, 1, padded + b"\x00" * 3),
            f.frame(f.CONTINUATION, f.END_HEADERS, 1, block[2:]),
            f.frame(f.DATA, f.PADDED, 1, bytes([4]) + f.grpc_message(b"x") + b"\x00" * 4),
            peer.trailers(1),
        )
        assert await drain(c) == [b"x"]
        updates = [fr for fr in peer.sent() if fr.kind == f.WINDOW_UPDATE]
        assert [(u.stream, struct.unpack(">I", u.payload)[0]) for u in updates] == [(1, 5)]  # the padding's window

    run(test)


def test_an_error_status_is_raised_after_the_messages_with_its_decoded_message() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer)
        peer.send(peer.response_head(1), message(b"a", 1), peer.trailers(1, 3, "bad%20thing%3A 100%25"))
        got = []
        with pytest.raises(RpcError) as info:
            async for m in c:
                got.append(m)
        assert got == [b"a"]
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details() == "bad thing: 100%"

    run(test)


def test_a_trailers_only_answer_and_an_http_error_status() -> None:
    async def test(peer: Peer) -> None:
        c1, c3 = call(peer), call(peer)
        peer.send(
            peer.headers(1, [(":status", "200"), ("grpc-status", "12")], f.END_HEADERS | f.END_STREAM),
            peer.headers(3, [(":status", "503")], f.END_HEADERS | f.END_STREAM),
        )
        with pytest.raises(RpcError) as one:
            await drain(c1)
        assert one.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(RpcError) as three:
            await drain(c3)
        assert three.value.code() == grpc.StatusCode.UNAVAILABLE

    run(test)


def test_refused_stream_is_unavailable_and_a_stream_end_without_status_is_internal() -> None:
    async def test(peer: Peer) -> None:
        c1, c3 = call(peer), call(peer)
        peer.send(
            f.rst_stream(1, f.REFUSED_STREAM),
            peer.response_head(3),
            f.frame(f.DATA, f.END_STREAM, 3, f.grpc_message(b"z")),
        )
        with pytest.raises(RpcError) as one:
            await drain(c1)
        assert one.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RpcError) as three:
            await drain(c3)
        assert three.value.code() == grpc.StatusCode.INTERNAL

    run(test)


def test_goaway_fails_only_the_calls_it_never_started_and_stops_new_ones() -> None:
    async def test(peer: Peer) -> None:
        c1, c3 = call(peer), call(peer)
        peer.send(f.frame(f.GOAWAY, 0, 0, struct.pack(">II", 1, 0)))
        with pytest.raises(RpcError) as three:
            await drain(c3)
        assert three.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not peer.conn.usable and peer.channel._conn is None
        assert not peer.transport.closed  # call 1 goes on
        peer.send(peer.response_head(1), message(b"done", 1), peer.trailers(1))
        assert await drain(c1) == [b"done"]
        assert peer.transport.closed  # its last call ended

    run(test)


def test_cancel_resets_the_stream_and_reading_raises_cancelled() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer)
        peer.sent()
        assert c.cancel()
        assert not c.cancel()
        resets = [fr for fr in peer.sent() if fr.kind == f.RST_STREAM]
        assert [(r.stream, struct.unpack(">I", r.payload)[0]) for r in resets] == [(1, f.CANCEL)]
        with pytest.raises(asyncio.CancelledError):
            await drain(c)
        peer.send(peer.response_head(1), message(b"late", 1))  # frames for a reset stream are dropped
        assert peer.conn.streams == {}

    run(test)


def test_the_deadline_resets_the_stream() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer, timeout=0.05)
        with pytest.raises(RpcError) as info:
            await drain(c)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert any(fr.kind == f.RST_STREAM for fr in peer.sent())

    run(test)


def test_a_request_larger_than_the_windows_waits_for_window_updates() -> None:
    async def test(peer: Peer) -> None:
        peer.send(f.settings_frame({f.SETTINGS_INITIAL_WINDOW_SIZE: 10}))
        assert any(fr.kind == f.SETTINGS and fr.flags & f.ACK for fr in peer.sent())
        c = call(peer, b"x" * 30)  # 35 bytes with the prefix
        sizes = [len(fr.payload) for fr in peer.sent() if fr.kind == f.DATA]
        assert sizes == [10]
        peer.send(f.window_update(1, 20))
        sizes = [(len(fr.payload), fr.flags & f.END_STREAM) for fr in peer.sent() if fr.kind == f.DATA]
        assert sizes == [(20, 0)]
        peer.send(f.settings_frame({f.SETTINGS_INITIAL_WINDOW_SIZE: 15}))  # +5 for open streams
        sent = [(len(fr.payload), fr.flags & f.END_STREAM) for fr in peer.sent() if fr.kind == f.DATA]
        assert sent == [(5, f.END_STREAM)]
        c.cancel()

    run(test)


def test_reading_gives_the_stream_window_back_and_ping_is_answered() -> None:
    async def test(peer: Peer) -> None:
        from proxygate.rpc.channel import STREAM_WINDOW

        c = call(peer)
        peer.sent()
        body = b"m" * 1000
        count = STREAM_WINDOW // 1005 + 1
        peer.send(peer.response_head(1), *(message(body, 1) for _ in range(count)))
        peer.send(f.frame(f.PING, 0, 0, b"12345678"))
        pongs = [fr for fr in peer.sent() if fr.kind == f.PING]
        assert [(p.flags, p.payload) for p in pongs] == [(f.ACK, b"12345678")]
        for _ in range(count):
            assert await c.__anext__() == body
        given = sum(struct.unpack(">I", fr.payload)[0] for fr in peer.sent() if fr.kind == f.WINDOW_UPDATE)
        assert given >= STREAM_WINDOW // 2
        c.cancel()

    run(test)


def test_a_protocol_error_fails_every_call_and_drops_the_connection() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer)
        peer.send(f.frame(f.CONTINUATION, f.END_HEADERS, 1, b""))
        with pytest.raises(RpcError) as info:
            await drain(c)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert peer.transport.closed

    run(test)


def test_a_header_that_is_not_utf8_drops_the_connection_cleanly() -> None:
    async def test(peer: Peer) -> None:
        c = call(peer)
        block = f.literal(b"x-bad", b"\xff\xfe")  # hpack reads values as UTF-8 and raises on these
        peer.send(f.frame(f.HEADERS, f.END_HEADERS, 1, b"\x88" + block))
        with pytest.raises(RpcError) as info:
            await drain(c)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert peer.transport.closed

    run(test)


def test_grpc_timeout_uses_at_most_eight_digits() -> None:
    decoder = Decoder()
    for seconds, want in ((0.0000001, "1u"), (1.5, "1500000u"), (100.0, "100000m"), (1e6, "1000000S")):
        assert dict(decoder.decode(f.grpc_timeout(seconds)))["grpc-timeout"] == want


def test_a_message_that_does_not_decode_ends_the_call_internal() -> None:
    async def test(peer: Peer) -> None:
        from proxygate._pb import inference_pb2

        c = peer.channel.unary_stream("/t.T/M", b"", inference_pb2.TokenResponse.FromString, 5)
        peer.sent()
        good = inference_pb2.TokenResponse(token="a", token_count=1).SerializeToString()
        peer.send(peer.response_head(1), message(good, 1), message(b"\xff\xff\xff", 1))
        assert (await c.__anext__()).token == "a"
        with pytest.raises(RpcError) as info:
            await c.__anext__()
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert any(fr.kind == f.RST_STREAM for fr in peer.sent())
        # The same when the call's end had arrived too: no silent end after "a".
        c3 = peer.channel.unary_stream("/t.T/M", b"", inference_pb2.TokenResponse.FromString, 5)
        peer.send(peer.response_head(3), message(good, 3), message(b"\xff\xff\xff", 3), message(good, 3))
        peer.send(peer.trailers(3))
        assert (await c3.__anext__()).token == "a"
        with pytest.raises(RpcError) as again:
            await c3.__anext__()
        assert again.value.code() == grpc.StatusCode.INTERNAL

    run(test)


def test_a_connection_attempt_that_never_completes_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from proxygate.rpc import channel as channel_module

    monkeypatch.setattr(channel_module, "CONNECT_TIMEOUT", 0.05)

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def never(*args: Any, **kwargs: Any) -> Any:  # a SYN nobody answers
            await asyncio.sleep(3600)

        loop.create_connection = never  # type: ignore[method-assign]
        channel = Channel("127.0.0.1:1")
        c = channel.unary_stream("/t.T/M", b"", bytes, 30)
        with pytest.raises(RpcError) as info:
            await drain(c)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert channel._connecting is None and channel._waiting == []

    asyncio.run(main())
