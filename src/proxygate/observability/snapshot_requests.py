"""Asking the other serving processes for a fresh metrics snapshot before a scrape.

With `--workers N` each process publishes its metrics to a file about once a
second (`metrics_exchange.py`), so a scrape that merged those files alone
would miss what the others counted in the last second: a client that is
refused and then reads `/metrics` might not find its refusal there. Before
a scrape, the answering process asks every other one to publish now and
waits for each to say it has (at most `timeout`; a process that does not
answer in time is merged from its last file). A process that is blocked or
gone costs the scrape that wait, never an error.

Each process binds a unix datagram socket `ask-<index>.sock` in the shared
runtime folder. A request is b"?" and an 8-byte number; the answer, sent
back to the asker's own socket once the snapshot file has been replaced, is
b"!" and the same number. Requests read in one pass share one publish.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("proxygate.metrics")

_ASK, _DONE = b"?", b"!"
_NUMBER = struct.Struct("!Q")
_MESSAGE_SIZE = 1 + _NUMBER.size
DEFAULT_TIMEOUT = 0.5


def _socket_name(index: int | str) -> str:
    return f"ask-{index}.sock"


class SnapshotRequests:
    def __init__(self, directory: str | Path, index: int, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.directory = Path(directory)
        self.index = index
        self.timeout = timeout
        self._path = self.directory / _socket_name(index)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._publish: Callable[[], None] = lambda: None
        self._numbers = itertools.count(1)
        # request number -> (answers still awaited, resolved when none is)
        self._waiting: dict[int, tuple[set[str], asyncio.Future[None]]] = {}

    def start(self, loop: asyncio.AbstractEventLoop, publish: Callable[[], None]) -> None:
        """Answer the others' requests with `publish` (which writes this process's snapshot)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)  # left by a predecessor with this index that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(self._path))
        sock.setblocking(False)
        self._sock, self._loop, self._publish = sock, loop, publish
        loop.add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)
        for _, done in self._waiting.values():
            if not done.done():
                done.set_result(None)

    async def refresh(self) -> int:
        """Have every other process publish now; how many did within the timeout."""
        sock = self._sock
        if sock is None:
            return 0
        number = next(self._numbers)
        message = _ASK + _NUMBER.pack(number)
        asked: set[str] = set()
        for path in self.directory.glob(_socket_name("*")):
            if path == self._path:
                continue
            try:
                sock.sendto(message, str(path))
            except OSError:
                continue  # gone (refused, removed) or its queue is full: merged from its last file
            asked.add(str(path))
        if not asked:
            return 0
        assert self._loop is not None
        done: asyncio.Future[None] = self._loop.create_future()
        waiting = (set(asked), done)
        self._waiting[number] = waiting
        try:
            await asyncio.wait((done,), timeout=self.timeout)
        finally:
            del self._waiting[number]
        return len(asked) - len(waiting[0])

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None
        askers: list[tuple[bytes, str]] = []
        while True:
            try:
                data, sender = sock.recvfrom(_MESSAGE_SIZE)
            except OSError:  # BlockingIOError: all read
                break
            if len(data) != _MESSAGE_SIZE or not isinstance(sender, str) or not sender:
                continue
            if data[:1] == _ASK:
                askers.append((data, sender))
            elif data[:1] == _DONE:
                self._answered(_NUMBER.unpack_from(data, 1)[0], sender)
        if not askers:
            return
        try:
            self._publish()
        except OSError as exc:
            log.warning("cannot publish metrics for another process's scrape: %s", exc)
            return  # no answer: the asker waits out its timeout and reads the last file
        for data, sender in askers:
            with contextlib.suppress(OSError):  # the asker went away: nobody waits for this answer
                sock.sendto(_DONE + data[1:], sender)

    def _answered(self, number: int, sender: str) -> None:
        waiting = self._waiting.get(number)
        if waiting is None:
            return  # a late answer to a scrape that stopped waiting
        pending, done = waiting
        pending.discard(sender)
        if not pending and not done.done():
            done.set_result(None)
