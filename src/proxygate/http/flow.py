"""Backpressure in both directions, as two small objects.

`BodyBuffer` holds bytes read from a transport until a consumer takes them;
past a high-water mark it pauses the transport's reading, so a fast sender
never fills our memory. `WriteFlow` mirrors the transport's
pause_writing/resume_writing and lets a writer wait for the peer to catch up,
with a timeout that applies to one stalled write, never to a long transfer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..errors import WriteStalled

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


def _release(waiter: asyncio.Future[None] | None) -> None:
    """Wake whoever waits on `waiter`, if anyone still does."""
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


class BodyBuffer:
    """Bytes of one message body in arrival order, read by one consumer."""

    __slots__ = ("_chunks", "_size", "_eof", "_exc", "_waiter", "_transport", "_paused", "received", "_on_first_read")

    def __init__(
        self, transport: asyncio.BaseTransport | None, on_first_read: Callable[[], None] | None = None
    ) -> None:
        # Called once when the consumer first asks for bytes: a client that
        # sent `Expect: 100-continue` is told to go ahead only then.
        self._on_first_read = on_first_read
        # A list: it is only appended to and emptied whole, and making a deque
        # costs 1,900 instructions (callgrind), a list 200, once per body.
        self._chunks: list[bytes] = []
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport = transport
        self._paused = False
        self.received = 0

    @property
    def at_eof(self) -> bool:
        return self._eof and not self._chunks

    @property
    def complete(self) -> bool:
        """Everything was read and the body ended normally (not by an error)."""
        return self._eof and not self._chunks and self._exc is None

    @property
    def finished_receiving(self) -> bool:
        return self._eof

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.received += len(data)
        if self._size > HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()  # type: ignore[attr-defined]
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._eof = True
        self._wake()

    def _wake(self) -> None:
        _release(self._waiter)

    def _resume(self) -> None:
        if self._paused and self._size <= LOW_WATER:
            self._paused = False
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()  # type: ignore[attr-defined]

    async def read(self, timeout: float | None = None) -> bytes:
        """All buffered bytes joined, waiting for some first; b"" at the end."""
        if self._on_first_read is not None:
            self._on_first_read()
            self._on_first_read = None
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                if timeout:
                    await asyncio.wait_for(self._waiter, timeout)
                else:
                    await self._waiter
            finally:
                self._waiter = None
        return self.read_nowait()

    @property
    def untouched(self) -> bool:
        """Nothing was read yet and nothing went wrong: every byte received is still here."""
        return self._size == self.received and self._exc is None

    def peek(self) -> bytes:
        """The buffered bytes, left in place."""
        return b"".join(self._chunks)

    def read_nowait(self) -> bytes:
        """Whatever is buffered right now, without waiting (b"" when nothing)."""
        if not self._chunks:
            if self._exc is not None:
                raise self._exc
            return b""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._size = 0
        self._resume()
        return data


class WriteFlow:
    """Tracks whether our transport asked us to stop writing."""

    __slots__ = ("_paused", "_waiter", "_closed")

    def __init__(self) -> None:
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._release()

    def close(self) -> None:
        self._closed = True
        self._release()

    def _release(self) -> None:
        _release(self._waiter)

    async def drain(self, timeout: float) -> None:
        """Return once the peer has taken our buffered bytes below the low mark.

        Raises WriteStalled when the peer takes nothing for `timeout` seconds,
        ConnectionResetError when the connection went away.
        """
        if self._closed:
            raise ConnectionResetError("connection closed")
        if not self._paused:
            return
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            if timeout:
                await asyncio.wait_for(self._waiter, timeout)
            else:
                await self._waiter
        except asyncio.TimeoutError:
            raise WriteStalled(f"write stalled for {timeout:g}s") from None
        finally:
            self._waiter = None
        if self._closed:
            raise ConnectionResetError("connection closed")
