"""A small pipelined Redis client for the rate limiter's one hot command.

Why not redis-py: its asyncio client spent ~83 µs of CPU per EVALSHA here
(pool checkout, packing, parsing), which cost the gateway more than half of
its request rate (bench/RESULTS.md). Here every check is one pre-encoded write
on a shared connection and one future resolved by the reply parser: commands
from concurrent requests are pipelined for free and replies come back in
order. A few connections are used round-robin (the pool); a call that gets no
reply within its deadline fails, and its late reply is skipped when it comes.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque

from .resp import Reply, ReplyParser, RespError, encode_command


class RedisUnavailable(Exception):
    pass


class _RespConnection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # kept: looking it up costs a syscall
        self.parser = ReplyParser()
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.parser.feed(data)
        except ValueError:
            self.transport.abort()  # type: ignore[union-attr]
            return
        waiting = self.waiting
        for reply in replies:
            if not waiting:
                break
            fut = waiting.popleft()
            if not fut.done():  # done = timed out or cancelled: skip its late reply
                fut.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        err = RedisUnavailable(f"connection lost: {exc}" if exc else "connection closed")
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(err)

    def send(self, data: bytes) -> asyncio.Future[Reply]:
        fut: asyncio.Future[Reply] = self.loop.create_future()
        self.waiting.append(fut)
        self.transport.write(data)  # type: ignore[union-attr]
        return fut


def _expire(fut: asyncio.Future[Reply], message: str) -> None:
    if not fut.done():
        fut.set_exception(RedisUnavailable(message))


class PipelinedRedis:
    """`call()` sends one command and returns its reply; errors raise RedisUnavailable/RespError."""

    def __init__(self, host: str, port: int, timeout: float = 0.25, connections: int = 4, retry_interval: float = 0.5):
        self.host = host
        self.port = port
        self.timeout = timeout or None
        self.retry_interval = retry_interval
        self._slots: list[_RespConnection | None] = [None] * max(1, connections)
        self._connecting: list[asyncio.Future[_RespConnection] | None] = [None] * len(self._slots)
        self._next = 0
        self._down_until = 0.0

    async def _connection(self) -> _RespConnection:
        index = self._next
        self._next = (index + 1) % len(self._slots)
        conn = self._slots[index]
        if conn is not None and not conn.lost:
            return conn
        pending = self._connecting[index]
        if pending is not None:
            return await asyncio.shield(pending)
        if time.monotonic() < self._down_until:
            # Redis was just found down: fail fast instead of a dial per request.
            raise RedisUnavailable(f"Redis at {self.host}:{self.port} is down")
        loop = asyncio.get_running_loop()
        pending = self._connecting[index] = loop.create_future()
        try:
            _t, fresh = await asyncio.wait_for(
                loop.create_connection(_RespConnection, self.host, self.port), self.timeout
            )
        except (OSError, asyncio.TimeoutError) as exc:
            self._down_until = time.monotonic() + self.retry_interval
            error = RedisUnavailable(f"cannot reach Redis at {self.host}:{self.port}: {exc or 'timeout'}")
            pending.set_exception(error)
            pending.exception()  # retrieved: waiters re-raise it themselves
            raise error from None
        finally:
            self._connecting[index] = None
        self._slots[index] = fresh
        pending.set_result(fresh)
        return fresh

    async def call_encoded(self, command: bytes) -> Reply:
        conn = await self._connection()
        fut = conn.send(command)
        if self.timeout and not fut.done():
            timer = fut.get_loop().call_later(
                self.timeout, _expire, fut, f"no reply from Redis within {self.timeout:g}s"
            )
            try:
                reply = await fut
            finally:
                timer.cancel()
        else:
            reply = await fut
        if isinstance(reply, RespError):
            raise reply
        return reply

    async def call(self, *args: bytes | str | int | float) -> Reply:
        return await self.call_encoded(encode_command(*args))

    async def aclose(self) -> None:
        for conn in self._slots:
            if conn is not None and conn.transport is not None:
                conn.transport.close()
        self._slots = [None] * len(self._slots)


class Script:
    """A Lua script run by EVALSHA, loaded on demand (NOSCRIPT → SCRIPT LOAD, once)."""

    def __init__(self, client: PipelinedRedis, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[str]) -> Reply:
        command = encode_command("EVALSHA", self.sha, len(keys), *keys, *args)
        try:
            return await self.client.call_encoded(command)
        except RespError as exc:
            if exc.kind != "NOSCRIPT":
                raise
        await self.client.call("SCRIPT", "LOAD", self.source)
        return await self.client.call_encoded(command)
