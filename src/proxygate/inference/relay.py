"""One inference plane for several serving processes (`--workers N`).

The kernel spreads connections over N processes, but the inference plane
must be one: one queue order, one view of each worker's free slots, one
coalescing table, one prefix index. So one process (the first) owns it. The
others hand it their clients' connections when they can (`handoff.py`); the
requests they cannot hand over they relay to it over a unix socket as plain HTTP/1.1,
streaming the response back as it comes (`InferenceRelay`). The owner serves
those connections with `RelayedApi`: straight to the API router, since the
relaying process already checked the client's key and rate limit. The
relaying process counts the request in its metrics; the owner writes its
access-log line, since only it knows the route, model and token usage. The
client's address and API key name travel in `X-Proxygate-Client` and
`X-Proxygate-Tenant`, headers the relay sets itself (a client's own are
dropped).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from ..api import ApiRouter, origin_path
from ..errors import ServiceUnavailable
from ..http.message import Headers, Request
from ..http.write_batch import WriteBatch
from ..proxy.forward import Forwarder, Target
from ..proxy.upstream import ResponseHead, UpstreamPool

if TYPE_CHECKING:
    from ..config import GatewaySettings
    from ..http.connection import ClientConnection
    from ..http.exchange import Exchange

P = TypeVar("P", bound=asyncio.BaseProtocol)

CLIENT_HEADER = b"x-proxygate-client"
TENANT_HEADER = b"x-proxygate-tenant"
RELAYED_PATHS = (b"/v1/inference", b"/v1/models", b"/v1/completions", b"/v1/chat/completions")


class UnixDialer:
    """Opens connections to the owner's socket (the pool's host and port are ignored)."""

    def __init__(self, path: str) -> None:
        self.path = path

    async def open(self, host: str, port: int, factory: Callable[[], P]) -> tuple[asyncio.Transport, P]:
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_unix_connection(factory, self.path)
        except OSError as exc:
            raise ServiceUnavailable(
                f"inference plane unavailable: {exc.strerror or exc}", headers=[(b"Retry-After", b"2")]
            ) from None
        return transport, protocol


class InferenceRelay(Forwarder):
    """A sibling process's `/v1/*` handler: the request goes to the owner, the answer comes back."""

    request_skip = Forwarder.request_skip | {CLIENT_HEADER, TENANT_HEADER}
    via = None

    def __init__(self, path: str, writes: WriteBatch, read_timeout: float) -> None:
        super().__init__(UpstreamPool(UnixDialer(path), 256, 60.0, writes), read_timeout)

    def extra_request_lines(self, req: Request) -> bytes:
        lines = b"X-Proxygate-Client: %s\r\n" % req.peer_ip.encode("latin-1")
        if req.tenant:
            lines += b"X-Proxygate-Tenant: %s\r\n" % req.tenant.encode("latin-1")
        return lines

    def response_headers(self, req: Request, head: ResponseHead) -> Headers:
        req.logged_elsewhere = True  # the owner answered: its access-log line has the route and usage
        # The owner's X-Request-ID is ours already; our own head writes it again.
        head.headers = [h for h in head.headers if h[0].lower() != b"x-request-id"]
        return super().response_headers(req, head)

    async def handle(self, req: Request, ex: Exchange) -> None:
        ex.end_on_client_eof()
        target = Target(b"http://inference-plane" + req.target)
        await self.forward(req, target, ex)

    def close(self) -> None:
        self.pool.close_all()


class RelayedApi:
    """The owner's side: the `Application` for connections from sibling processes."""

    def __init__(
        self,
        settings: GatewaySettings,
        writes: WriteBatch,
        api: ApiRouter,
        track: Tracker,
        log_request: Callable[[Request, Exchange], None],
    ) -> None:
        self.settings = settings
        self.writes = writes
        self.api = api
        self.track = track
        self.log_request = log_request

    async def handle(self, req: Request, ex: Exchange) -> None:
        client = req.header(CLIENT_HEADER)
        if client is not None:
            req.peer_ip = client.decode("latin-1")
        tenant = req.header(TENANT_HEADER)
        if tenant is not None:
            req.tenant = tenant.decode("latin-1")  # authenticated by the relaying process
        await self.api.dispatch(req, origin_path(req.target), ex)

    def request_done(self, req: Request, ex: Exchange) -> None:
        # Counted in the metrics where the client connected; logged here,
        # where the route, model and token usage are known.
        self.log_request(req, ex)

    def connection_opened(self, conn: ClientConnection) -> None:
        self.track.track(conn)

    def moved_at_accept(self, conn: ClientConnection) -> bool:
        return False

    def connection_closed(self, conn: ClientConnection) -> None:
        self.track.untrack(conn)


class Tracker(Protocol):
    """Where the owner keeps its relayed connections, so shutdown drains them too."""

    def track(self, conn: ClientConnection) -> None: ...

    def untrack(self, conn: ClientConnection) -> None: ...
