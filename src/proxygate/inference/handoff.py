"""Moving a client connection to the process that owns the inference plane.

With `--workers N` one process owns the inference plane (`relay.py`). A
sibling that reads an inference request head could relay it, but then every
token crosses two processes. Instead it hands the client's socket itself to
the owner (SCM_RIGHTS over a unix socket), together with the bytes it has
already read (the request head, rebuilt, and whatever of the body arrived),
and forgets the connection. The owner adopts the socket as if it had
accepted it and parses those bytes first, so the client talks to the owner
directly from then on: no hop for the answer, none for the next request on
the same connection. Policies (access, rate limit) run in the owner, once.

A connection moves only between requests' bytes: nothing pipelined after
the request, no chunked body (its raw bytes are gone once decoded), no TLS
(its session state cannot move), nothing left to write. Otherwise, or when
the owner cannot be reached, the sibling relays as before.

While the owner has room (fewer than `--spread-above` client connections,
counted in memory that every process shares, and under a quarter of a core
in use), a sibling moves each new plain connection at once, before reading a
byte: the move then overlaps the client sending its request instead of
following it, so a request on a new connection costs what it would had the
owner accepted it, and a light load is served by one process. Under load
nothing moves this way, and the kernel's spread of connections over the
processes holds. (A load of short connections never reaches a sibling
while the owner has room: the kernel gives them to the owner, `steering.py`.)

Wire format, per connection: a 4-byte big-endian length, then that many
bytes; the socket travels as ancillary data with the frame's first byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
from array import array
from collections import deque
from collections.abc import Awaitable, Callable

log = logging.getLogger("proxygate.handoff")

HANDOFF_SOCKET = "handoff.sock"
_LENGTH = struct.Struct("!I")
_MAX_FRAME = 8 * 1024 * 1024  # a head (64 KiB at most) and at most a 1 MiB JSON body; anything larger is a bug
_EMPTY_FRAME = _LENGTH.pack(0)  # a connection moved before any of its bytes were read


def handoff_path(inference_socket: str) -> str:
    """The owner's handoff socket, beside its relay socket."""
    return os.path.join(os.path.dirname(inference_socket), HANDOFF_SOCKET)


class OwnerLoad:
    """How many client connections the owner has, as every process sees it, in shared memory.

    Made before the processes are forked. Three kinds of slot, each with one
    writer, so no update is lost: the connections the owner has open (it
    writes the number as they open and close), the connections it has
    adopted from the others, and per process the connections that process
    has passed it. A move counts from the moment it is made: passed minus
    adopted are on their way. Otherwise a burst of new connections (a load
    generator opening 64 at once) would find the owner idle 64 times over,
    before it adopted the first, and all of them would move. Read without a
    lock: the count only steers where a connection goes.
    """

    def __init__(self, processes: int) -> None:
        self._slots = memoryview(mmap.mmap(-1, 8 * (_PASSED + processes))).cast("q")  # shared across fork
        self._passed = slice(_PASSED, _PASSED + processes)
        self.processes = processes
        self.index = 0  # the process this copy belongs to, set in each one after the fork

    @property
    def connections(self) -> int:
        slots = self._slots
        return slots[_OPEN] + sum(slots[self._passed]) - slots[_ADOPTED]

    def room_at_accept(self, spread_above: int) -> bool:
        """Whether the owner takes a connection another process has just accepted:
        fewer than `--spread-above` connections and under a quarter of a core in
        use (`--spread-above 0`: never). Stricter than `has_room`: a load of one
        short connection per request keeps the count low, and would otherwise
        pass through one process to the other until the owner saturates."""
        return self.connections < spread_above and self.busy < MOVE_AT_ACCEPT_WHILE_BUSY_BELOW

    @property
    def busy(self) -> float:
        """The share of a core the owner's event loop used, as last measured (`busy.py`)."""
        return self._slots[_BUSY] / 1000

    def publish_busy(self, share: float) -> None:
        """The owner: its share of a core, measured."""
        self._slots[_BUSY] = int(share * 1000)

    def has_room(self, spread_above: int) -> bool:
        """Whether the owner takes another kept-alive connection from the others
        (`--spread-above`): below that many connections, or while it uses less
        than half a core."""
        return self.connections < spread_above or self.busy < GATHER_WHILE_BUSY_BELOW

    def keeps_new_connections(self, steered: bool, connections: int, spread_above: int, busy: float) -> bool:
        """The owner, holding `connections` and using `busy` of a core: whether the kernel
        should give it every new connection (`steering.py`). Fewer than `--spread-above`,
        and under 80 % of a core in use; once it was more, under 80 % shared by every
        process (40 % for two). While the kernel spreads, the owner gets its share of the
        load: without that margin it would look free again at once, and the load would
        swing between one process and all.
        """
        if connections >= spread_above:
            return False
        return busy < (STEER_WHILE_BUSY_BELOW if steered else STEER_WHILE_BUSY_BELOW / self.processes)

    def overloaded(self, connections: int, spread_above: int) -> bool:
        """The owner, holding `connections`: saturated with more than it gathers,
        it should let some go. Between this and `has_room` nothing moves."""
        return connections > spread_above and self.busy >= SHED_WHILE_BUSY_ABOVE

    def restart(self) -> None:
        """The owner, starting (again, if its predecessor died): nothing open, nothing on its way.

        Connections passed to a predecessor that died were never adopted;
        without this they would count for ever."""
        self._slots[_OPEN] = 0
        self._slots[_ADOPTED] = sum(self._slots[self._passed])

    def publish(self, connections: int) -> None:
        """The owner: how many client connections it has open now (adopted ones included)."""
        self._slots[_OPEN] = connections

    def adopted(self) -> None:
        """The owner: one connection passed to it has been adopted (or was gone on arrival)."""
        self._slots[_ADOPTED] += 1

    def passed(self) -> None:
        """This process has passed the owner a connection."""
        self._slots[_PASSED + self.index] += 1


_OPEN, _ADOPTED, _BUSY, _PASSED = 0, 1, 2, 3  # OwnerLoad's slots; per-process ones from _PASSED on

# Beyond --spread-above connections the others still pass the owner kept-alive
# connections while it uses less than half a core, and it lets connections go
# while it uses more than 85 % (on a box it shares, a saturated process gets
# about 90 % of a core). New connections move at accept only while it uses
# less than a quarter; short ones the kernel gives it (`steering.py`) while it
# uses less than 80 %. Measured by `busy.py`.
GATHER_WHILE_BUSY_BELOW = 0.5
SHED_WHILE_BUSY_ABOVE = 0.85
MOVE_AT_ACCEPT_WHILE_BUSY_BELOW = 0.25
STEER_WHILE_BUSY_BELOW = 0.8
_CONNECT_RETRY = 0.01  # while the owner starts: it listens for handoffs before it says it is ready


class HandoffSender:
    """A sibling's side: one unix stream to the owner, frames sent one at a time."""

    def __init__(self, path: str, load: OwnerLoad | None = None) -> None:
        self.path = path
        self.load = load  # counts each connection passed
        self._sock: socket.socket | None = None
        self._lock = asyncio.Lock()
        self._connecting: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    async def send(self, fd: int, preface: bytes) -> bool:
        """Pass `fd` and the bytes read from it so far; False if the owner could not take it."""
        frame = _LENGTH.pack(len(preface)) + preface
        async with self._lock:
            try:
                sock = await self._connected()
                sent = await _sendmsg_with_fd(sock, frame, fd)
                if sent < len(frame):
                    await asyncio.get_running_loop().sock_sendall(sock, frame[sent:])
            except OSError as exc:
                log.warning("cannot hand a connection to the inference plane's owner: %s", exc)
                self.close()
                return False
        if self.load is not None:
            self.load.passed()
        return True

    def send_now(self, fd: int) -> bool:
        """Pass a new connection's socket, none of its bytes read, if that needs no waiting.

        False (and the caller keeps the connection) while the stream to the
        owner is not connected yet (a connect starts in the background),
        busy with another frame, or full.
        """
        sock = self._sock
        if sock is None:
            self._connect_soon()
            return False
        if self._lock.locked():
            return False
        try:
            sent = sock.sendmsg([_EMPTY_FRAME], _fd_attached(fd))
        except BlockingIOError:
            return False
        except OSError as exc:
            log.warning("cannot hand a connection to the inference plane's owner: %s", exc)
            self.close()
            return False
        if sent < len(_EMPTY_FRAME):
            # Part of a 4-byte frame (no stream socket does this in practice): end the
            # stream, so the owner drops the part and its socket, and keep the connection.
            self.close()
            return False
        if self.load is not None:
            self.load.passed()
        return True

    async def connect(self, within: float) -> bool:
        """Connect to the owner before serving, trying again while it starts (up to `within`
        seconds): a connection accepted before then could not move at accept. False if the
        owner is not there yet; each send tries again."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + within
        while True:
            try:
                async with self._lock:
                    await self._connected()
                return True
            except OSError:
                if loop.time() >= give_up:
                    return False
                await asyncio.sleep(_CONNECT_RETRY)

    def _connect_soon(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect_quietly())

    async def _connect_quietly(self) -> None:
        try:
            async with self._lock:
                await self._connected()
        except OSError as exc:
            log.debug("inference plane's owner not reachable yet: %s", exc)
        finally:
            self._connecting = None

    async def _connected(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, self.path)
            except OSError:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _fd_attached(fd: int) -> list[tuple[int, int, array[int]]]:
    """sendmsg's ancillary data that passes `fd` along (SCM_RIGHTS)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))]


async def _sendmsg_with_fd(sock: socket.socket, frame: bytes, fd: int) -> int:
    """sendmsg the frame's start with the fd attached, waiting while the socket is full."""
    ancillary = _fd_attached(fd)
    loop = asyncio.get_running_loop()
    while True:
        try:
            return sock.sendmsg([frame], ancillary)
        except BlockingIOError:
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())


class HandoffReceiver:
    """The owner's side: accepts siblings' streams and adopts each socket that arrives."""

    def __init__(self, path: str, adopt: Callable[[socket.socket, bytes], Awaitable[object]]) -> None:
        self.path = path
        self.adopt = adopt
        self._listener: socket.socket | None = None
        self._streams: dict[int, _Stream] = {}
        self._adopting: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a predecessor that crashed
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(64)
        listener.setblocking(False)
        self._listener = listener
        asyncio.get_running_loop().add_reader(listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        stream = _Stream(conn)
        self._streams[conn.fileno()] = stream
        asyncio.get_running_loop().add_reader(conn.fileno(), self._readable, stream)

    def _readable(self, stream: _Stream) -> bool:
        """Read from a sibling's stream and adopt the sockets it carried; whether it may have more."""
        try:
            data, fds, _, _ = socket.recv_fds(stream.sock, 256 * 1024, 64)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        stream.fds.extend(fds)
        if not data:
            self._drop(stream)
            return False
        stream.buf += data
        while len(stream.buf) >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(stream.buf)
            if size > _MAX_FRAME or not stream.fds:
                log.error(
                    "handoff stream out of step (frame of %d bytes, %d sockets); dropping it", size, len(stream.fds)
                )
                self._drop(stream)
                return False
            end = _LENGTH.size + size
            if len(stream.buf) < end:
                return True
            preface = bytes(stream.buf[_LENGTH.size : end])
            del stream.buf[:end]
            task = asyncio.get_running_loop().create_task(self._adopt(stream.fds.popleft(), preface))
            self._adopting.add(task)
            task.add_done_callback(self._adopting.discard)
        return True

    async def _adopt(self, fd: int, preface: bytes) -> None:
        client = socket.socket(fileno=fd)
        try:
            await self.adopt(client, preface)
        except OSError as exc:  # the client left before it could be adopted
            log.debug("handed-over connection lost: %s", exc)
            client.close()

    def _drop(self, stream: _Stream) -> None:
        asyncio.get_running_loop().remove_reader(stream.sock.fileno())
        self._streams.pop(stream.sock.fileno(), None)
        for fd in stream.fds:
            os.close(fd)
        stream.sock.close()

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for stream in list(self._streams.values()):
            # Sockets a sibling has sent and we have not read would close with the
            # stream, their clients reset: they are adopted (and answered) first.
            while self._readable(stream):
                pass
            if stream.sock.fileno() in self._streams:
                self._drop(stream)
        if self._listener is not None:
            loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class _Stream:
    __slots__ = ("sock", "buf", "fds")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.fds: deque[int] = deque()
