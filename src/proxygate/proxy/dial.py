"""Resolve, apply the destination policy, connect: the one way upstream sockets open.

Failures come back as the status a proxy user expects: a name that does not
resolve or a refused connection → 502, a dial timeout → 504, a policy refusal
→ 403, each with a short reason naming the cause.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from ..errors import BadGateway, BadRequest, GatewayTimeout
from ..memo import memoized, remember
from ..policy.destinations import DestinationPolicy, IPAddress, SockAddr
from ..timeout_queue import TimeoutQueue

P = TypeVar("P", bound=asyncio.BaseProtocol)

# A DNS name: dot-separated labels of letters, digits, '-' and '_' (1–63 each).
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?:\.(?!-)[A-Za-z0-9_-]{1,63})*\.?")
_DNS_TTL = 10.0


@memoized
def _ip_literal(host: str) -> IPAddress | None:
    """`host` as an address when it is one (remembered: parsing costs about
    20,000 instructions, and a CONNECT to an address asks for each tunnel)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Dialer:
    def __init__(
        self,
        policy: DestinationPolicy,
        dial_timeout: float,
        getaddrinfo: Callable[..., Awaitable[list[Any]]] | None = None,
    ) -> None:
        self.policy = policy
        self.dial_timeout = dial_timeout
        self._getaddrinfo = getaddrinfo
        self._dns: dict[str, tuple[float, list[tuple[IPAddress, SockAddr]]]] = {}
        self._queue: TimeoutQueue | None = None  # the dial deadlines (`open`)

    async def resolve(self, host: str, port: int) -> list[tuple[IPAddress, SockAddr]]:
        known = self.resolved(host, port)
        return known if known is not None else await self._lookup(host, port)

    def resolved(self, host: str, port: int) -> list[tuple[IPAddress, SockAddr]] | None:
        """`host`'s addresses without waiting, when it is an address or a name resolved
        within the cache's time; else None."""
        ip = _ip_literal(host)
        if ip is not None:
            sockaddr: SockAddr = (host, port) if ip.version == 4 else (host, port, 0, 0)
            return [(ip, sockaddr)]
        if not _HOSTNAME.fullmatch(host) or len(host) > 253:
            raise BadRequest(f"malformed host name {host[:100]!r}")
        cached = self._dns.get(host)
        if cached is not None and cached[0] > time.monotonic():
            return [(ip, (sa[0], port, *sa[2:])) for ip, sa in cached[1]]
        return None

    async def _lookup(self, host: str, port: int) -> list[tuple[IPAddress, SockAddr]]:
        now = time.monotonic()
        getaddrinfo = self._getaddrinfo or asyncio.get_running_loop().getaddrinfo
        try:
            infos = await getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except socket.gaierror as exc:
            raise BadGateway(f"cannot resolve {host}: {exc.strerror or exc}") from None
        result: list[tuple[IPAddress, SockAddr]] = []
        seen = set()
        for _family, _type, _proto, _canon, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if ip not in seen:
                seen.add(ip)
                result.append((ip, sockaddr))
        remember(self._dns, host, (now + _DNS_TTL, result))
        return result

    async def open(
        self, host: str, port: int, factory: Callable[[], P], loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[asyncio.Transport, P]:
        """Connect to the first allowed address of host:port within the dial timeout
        (resolving the name included).

        `loop`: the running loop, when the caller has it (looking it up is a
        getpid() system call on 3.11, and a CONNECT dials once per tunnel).

        The deadline cancels the dialling task, as `asyncio.timeout` would,
        without its two getpid() system calls (on 3.11 it looks up the running
        loop and the current task) and without a loop timer per dial (every
        dial's deadline is the same length: `timeout_queue.py`). A
        cancellation from outside stays a cancellation.
        """
        loop = loop if loop is not None else asyncio.get_running_loop()
        if not self.dial_timeout:
            return await self._open(host, port, factory, loop)
        task = asyncio.current_task(loop)  # given the loop, no lookup
        assert task is not None
        cancelling = task.cancelling()
        timeout = self._deadlines(loop).start(task.cancel)
        try:
            return await self._open(host, port, factory, loop)
        except asyncio.CancelledError:
            if timeout.expired and task.uncancel() <= cancelling:
                raise GatewayTimeout(f"timed out connecting to {host}:{port} after {self.dial_timeout:g}s") from None
            raise
        finally:
            timeout.cancel()

    def _deadlines(self, loop: asyncio.AbstractEventLoop) -> TimeoutQueue:
        queue = self._queue
        if queue is None or queue.loop is not loop:
            queue = self._queue = TimeoutQueue(loop, self.dial_timeout)
        return queue

    async def _open(
        self, host: str, port: int, factory: Callable[[], P], loop: asyncio.AbstractEventLoop
    ) -> tuple[asyncio.Transport, P]:
        # Without a coroutine for what is known already (an address, a cached name).
        addresses = self.resolved(host, port)
        if addresses is None:
            addresses = await self._lookup(host, port)
        addresses = self.policy.allowed_addresses(host, port, addresses)
        last_error: OSError | None = None
        for ip, sockaddr in addresses:
            try:
                return await _connect(loop, factory, ip, sockaddr)
            except TimeoutError:  # the system's own connect timeout (ETIMEDOUT)
                raise GatewayTimeout(f"timed out connecting to {host}:{port}") from None
            except OSError as exc:
                last_error = exc
        assert last_error is not None  # `allowed_addresses` raises when none is left
        if isinstance(last_error, ConnectionRefusedError):
            raise BadGateway(f"connection refused by {host}:{port}")
        raise BadGateway(f"cannot connect to {host}:{port}: {last_error.strerror or last_error}")


async def _connect(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], P], ip: IPAddress, sockaddr: SockAddr
) -> tuple[asyncio.Transport, P]:
    """Connect to the address the policy allowed, and to no other.

    The loop's own connect, given the address as a numeric host, resolves
    nothing and costs about a quarter of connecting a socket of ours and
    wrapping it (measured on uvloop: 40 against 130-180 us of CPU per
    connection), which is what a new CONNECT tunnel mostly pays for. An IPv6
    address with a scope (link-local) keeps the socket path, which carries
    the whole socket address.
    """
    if len(sockaddr) == 2 or not sockaddr[3]:
        # sockaddr[0] is the address as text already (str(ip) formats it anew: about 3,000 instructions).
        transport, protocol = await loop.create_connection(factory, sockaddr[0], sockaddr[1])
        return transport, protocol  # TCP_NODELAY is the loop's default for TCP
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, sockaddr)
    except BaseException:
        sock.close()
        raise
    transport, protocol = await loop.create_connection(factory, sock=sock)
    return transport, protocol
