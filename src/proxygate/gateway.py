"""The gateway application: what each request is, and what is left when it is done.

`Gateway.handle` decides what a request is (a CONNECT tunnel, an
absolute-form proxy request, or a call to our own API), applies the
policies every kind shares (client access, rate limit), and passes it to
the handler of its kind: `proxy/connect.py`, `proxy/forward.py`, or the API
router (`api.py`; health and status in `endpoints.py`, the inference APIs in
`inference/`). When a request is done it records one access-log line and the
metrics. The connections it tracks are what shutdown drains. `wiring.py`
builds it.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from .api import ApiRouter, origin_path
from .busy import BusyMeter
from .config import GatewaySettings
from .endpoints import HEALTH_PATHS, Lifecycle
from .errors import BadRequest, HttpError
from .http.connection import ClientConnection
from .http.exchange import Exchange
from .http.message import Request
from .http.write_batch import WriteBatch
from .inference.handoff import HandoffSender, OwnerLoad
from .inference.openai_api import error_body
from .inference.relay import InferenceRelay, RelayedApi
from .inference.service import InferenceService
from .memo import memoized
from .observability.logging import AccessLog
from .observability.metrics import GatewayMetrics
from .policy.access import AccessPolicy
from .policy.blocklist import BlocklistFile
from .policy.budgets import Budgets
from .policy.destinations import DestinationPolicy
from .policy.keys import KeyFile
from .policy.ratelimit import RateLimiter, RateLimitPolicy
from .proxy.connect import ConnectHandler, parse_authority
from .proxy.dial import Dialer
from .proxy.forward import ForwardProxy, parse_target
from .proxy.upstream import UpstreamPool
from .steering import ConnectionSteering
from .watched_file import WatchedFile


@dataclass
class Parts:
    """Everything one gateway process is made of (see `wiring.build_gateway`)."""

    settings: GatewaySettings
    metrics: GatewayMetrics
    access_log: AccessLog
    writes: WriteBatch
    blocklist: BlocklistFile
    dialer: Dialer
    pool: UpstreamPool
    limiter: RateLimiter | None
    rate_limit: RateLimitPolicy | None
    keys: KeyFile | None
    access: AccessPolicy
    api: ApiRouter
    forward_proxy: ForwardProxy
    connect: ConnectHandler
    lifecycle: Lifecycle
    inference: InferenceService | None = None  # the process owning the inference plane
    budgets: Budgets | None = None
    relay: InferenceRelay | None = None  # the other processes (`--workers N`)
    handoff: HandoffSender | None = None
    owner_load: OwnerLoad | None = None  # `--workers N`: the owner's open connections, shared
    steering: ConnectionSteering | None = None  # the owner's: where the kernel sends new connections


class Gateway:
    def __init__(self, parts: Parts) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.metrics = parts.metrics
        self.connection_stats = parts.metrics.connection_stats
        self.access_log = parts.access_log
        self.writes = parts.writes
        self.blocklist = parts.blocklist
        self.pool = parts.pool
        self.limiter = parts.limiter
        self.keys = parts.keys
        self.access = parts.access
        self.inference = parts.inference
        self.lifecycle = parts.lifecycle
        self.connections: set[ClientConnection] = set()
        # With --workers N the owner publishes how many connections it has and how
        # busy it is; a sibling reads it to pass connections while the owner has room.
        self._publish_load = parts.owner_load if parts.handoff is None else None
        self._owner_load = parts.owner_load if parts.handoff is not None else None
        if self._publish_load is not None:
            self._publish_load.restart()
        # The owner, saturated, ends a kept-alive connection now and then (`_sheds`).
        self._shed_above = self.settings.spread_above if self._publish_load is not None else 0
        self._next_shed = 0.0
        self._busy_meter: BusyMeter | None = None
        # The owner, while it has room and its connections come and go, has the kernel
        # give it every new connection (`_steer`).
        self._steering = parts.steering if self._shed_above else None
        self._accepted = 0  # connections opened here since the busy meter's last tick
        self._churned = False  # at the tick before: more opened than twice those held
        # A sibling passes connections to the owner while the owner holds fewer
        # than this many (`moved_at_accept`, `_gather`); 0: never.
        self._gather_below = self.settings.spread_above if self._owner_load is not None else 0
        self._all_closed: asyncio.Event | None = None

    def relayed_api(self) -> RelayedApi:
        """The application serving sibling processes' relayed /v1/* requests (owner only)."""
        return RelayedApi(self.settings, self.writes, self.parts.api, self, self.log_request)

    def bound(self, port: int) -> None:
        """The listener is up on `port` (known only now when asked for port 0)."""
        self.parts.dialer.policy = DestinationPolicy.from_settings(self.settings, bound_port=port)
        if self.inference is not None:
            self.inference.start()
        if self._shed_above and self._publish_load is not None:
            # After the start's own work, which is not load: measured, it would keep
            # new connections from moving here for the first few tenths of a second.
            self._busy_meter = BusyMeter(asyncio.get_running_loop(), self._busy_measured)
            self._busy_meter.start()
        self.lifecycle.ready = True

    def watched_files(self) -> list[WatchedFile[Any]]:
        """Configuration files reloaded on SIGHUP and when they change."""
        files: list[WatchedFile[Any]] = [self.blocklist]
        if self.inference is not None and self.inference.routes.path:
            files.append(self.inference.routes)
        if self.keys is not None:
            files.append(self.keys)
        return files

    def reload_files(self) -> None:
        for watched in self.watched_files():
            watched.reload()

    # ---- connection bookkeeping ---------------------------------------------

    def connection_opened(self, conn: ClientConnection) -> None:
        self.track(conn)
        self.connection_stats.open_connections += 1
        self._accepted += 1
        if self.lifecycle.shutting_down:
            # Taken from the accept queue at the stop, handed over by a sibling, or its
            # TLS handshake ending: its client connected before the stop. Its first
            # request is answered, and then it closes.
            conn.shutdown(first_request_owed=True)

    def connection_closed(self, conn: ClientConnection) -> None:
        self.untrack(conn)
        self.connection_stats.open_connections -= 1

    def track(self, conn: ClientConnection) -> None:
        """A connection that shutdown waits for (a client's, or a relayed one)."""
        self.connections.add(conn)
        if self._publish_load is not None:
            self._publish_load.publish(len(self.connections))
            if self._steering is not None and len(self.connections) >= self._shed_above:
                self._steering.steer_to_first(False)  # at once: a burst must not all queue here

    def untrack(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self._publish_load is not None:
            self._publish_load.publish(len(self.connections))
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    def _busy_measured(self, share: float) -> None:
        """The owner's busy meter ticked: publish the share, and steer new connections by it.

        While the owner has room (`OwnerLoad.keeps_new_connections`) and its
        connections come and go (more opened since the last tick than twice
        those it holds: a new connection per request or so), the kernel gives
        it every new connection (`steering.py`): such a load is one process's
        without a move per connection, and the other process never wakes for
        it. Not for a burst of kept-alive connections from idle (a load
        generator opening 64 at once): the kernel would queue them all here
        before the owner could say stop, so those are spread and moved at
        accept as before. On at the second such tick in a row, off at the
        first that is not, and at once when the owner holds `--spread-above`
        connections (`track`).
        """
        load = self._publish_load
        assert load is not None
        load.publish_busy(share)
        steering = self._steering
        if steering is None:
            return
        held, accepted, self._accepted = len(self.connections), self._accepted, 0
        # The last interval alone as well as the smoothed share: a load that saturates
        # the owner from idle spreads after one tick, not three.
        assert self._busy_meter is not None
        busy = max(share, self._busy_meter.last)
        churning = accepted > 2 * held
        # On after two such ticks in a row: a load that starts in the middle of an
        # interval reads as light at the first, even one that will saturate the owner.
        steady = churning and (steering.to_first or self._churned)
        self._churned = churning
        steering.steer_to_first(steady and load.keeps_new_connections(steering.to_first, held, self._shed_above, busy))

    def moved_at_accept(self, conn: ClientConnection) -> bool:
        """A sibling passes a new connection to the owner while it has room at accept
        (`OwnerLoad.room_at_accept`: fewer than `--spread-above` connections and
        under a quarter of a core in use).

        Before any byte is read, so the move overlaps the client sending its
        request (`inference/handoff.py`): a light load is served by one
        process from a connection's first request, as one process would serve
        it (its upstream pool, its tail latency, its `/v1/*` plane without a
        move later). Under load each process keeps what the kernel gives it.
        TLS connections stay: their session cannot move.
        """
        load, handoff, transport = self._owner_load, self.parts.handoff, conn.transport
        if (
            load is None
            or handoff is None
            or transport is None
            or self.lifecycle.shutting_down  # the owner is draining too
            or not load.room_at_accept(self._gather_below)
        ):
            return False
        sock = transport.get_extra_info("socket")
        if sock is None or transport.get_extra_info("sslcontext") is not None or not handoff.send_now(sock.fileno()):
            return False
        conn.handed_over()
        self.metrics.handoffs.labels("moved").inc()
        return True

    # ---- dispatch ------------------------------------------------------------

    async def handle(self, req: Request, ex: Exchange) -> None:
        if req.method == "CONNECT":
            host, port = parse_authority(req.target)
            self.access.check_proxy(req)
            if (pending := self._rate_limit(req, "connect")) is not None:
                await pending
            await self.parts.connect.handle(req, ex, host, port)
            return
        if req.target[:1] == b"/":
            path = origin_path(req.target)
            if self.parts.handoff is not None and _inference_plane_path(path) and await self._hand_off(req, ex):
                return
            await self._api(req, path, ex)
            return
        if not req.is_absolute_form:
            if req.target == b"*" and req.method == "OPTIONS":
                ex.send(200, [(b"Allow", b"GET, HEAD, POST, CONNECT, OPTIONS")])
                return
            raise BadRequest("request target must be a path, an absolute http:// URL, or host:port for CONNECT")
        target = parse_target(req.target)
        if self.parts.dialer.policy.names_own_listener(target.host, target.port):
            await self._api(req, origin_path(target.path), ex)
            return
        if self._gather_below and ex.conn.served and await self._gather(req, ex):
            return
        if self._shed_above and self._sheds(ex):
            ex.close_when_done()
        self.access.check_proxy(req)
        if (pending := self._rate_limit(req, "proxy")) is not None:
            await pending
        await self.parts.forward_proxy.handle(req, ex, target)

    async def _api(self, req: Request, path: bytes, ex: Exchange) -> None:
        """Our own endpoints. Every error on `/v1/*` is in OpenAI's JSON shape, as its clients expect."""
        api = self.parts.api
        if not path.startswith(b"/v1/"):
            if (pending := self._rate_limit(req, self._endpoint(path))) is not None:
                await pending
            await api.dispatch(req, path, ex)
            return
        try:
            self.access.check_api(req)
            if (pending := self._rate_limit(req, self._endpoint(path))) is not None:
                await pending
            await api.dispatch(req, path, ex)
        except HttpError as exc:
            if ex.response_started:
                raise
            req.error = exc.reason
            ex.send(
                exc.status, [(b"Content-Type", b"application/json"), *exc.headers], error_body(exc.status, exc.reason)
            )

    def _endpoint(self, path: bytes) -> str:
        """The rate-limit class of an origin-form path ("" = exempt)."""
        if path in HEALTH_PATHS and not self.settings.rate_limit_health:
            return ""
        if path == b"/v1/inference":
            return "inference"
        if path.startswith(b"/v1/"):
            return "openai"
        return "other"

    def _rate_limit(self, req: Request, endpoint: str) -> Coroutine[Any, Any, None] | None:
        """Admit `req` or raise 429: decided on the spot (None) for in-process
        stores, else a coroutine the caller awaits (Redis)."""
        policy = self.parts.rate_limit
        if policy is None or not endpoint:
            return None
        if policy.charge_now is not None:
            req.extra_head = policy.admit_now(req, endpoint)
            return None
        return self._rate_limit_remote(policy, req, endpoint)

    async def _rate_limit_remote(self, policy: RateLimitPolicy, req: Request, endpoint: str) -> None:
        decision = await policy.admit(req, endpoint)
        if decision is not None:
            req.extra_head = decision.head_lines()

    async def _hand_off(self, req: Request, ex: Exchange) -> bool:
        """Move the connection to the inference plane's owner; False if it must stay here (relayed)."""
        moved = await self._move_to_owner(req, ex)
        self.metrics.handoffs.labels("moved" if moved else "relayed").inc()
        return moved

    async def _gather(self, req: Request, ex: Exchange) -> bool:
        """Pass a kept-alive proxy connection to the owner while it has room
        (`OwnerLoad.has_room`: fewer than `--spread-above` connections, or less
        than half a core in use); False if it stays here.

        Two processes that split a load one could carry each batch fewer
        requests per loop pass and compete with each other (and, on a shared
        box, with the clients and origins) for the cores: the tail is worse
        than one process's at the same load (bench/RESULTS.md). So such a load
        gathers in one process; when it outgrows it, the owner lets
        connections go (`_sheds`). This is for the connections that stayed
        where they were accepted (the owner had no room at accept, a stricter
        test: `moved_at_accept`), at their second request.
        """
        load = self._owner_load
        assert load is not None
        if not load.has_room(self._gather_below):
            return False
        if not await self._move_to_owner(req, ex):
            return False
        self.connection_stats.gathered += 1
        return True

    def _sheds(self, ex: Exchange) -> bool:
        """The owner, saturated with more than `--spread-above` connections: whether
        this response ends its connection (`Connection: close`).

        Gathered connections stay with the owner; when the load grows past what
        it can carry, some must go. A client told to close reconnects, the
        kernel gives the new connection to any process, and the others keep
        theirs while the owner stays busy. At most one connection every
        SHED_EVERY seconds, so the split settles instead of swinging.
        """
        load = self._publish_load
        assert load is not None
        if not load.overloaded(len(self.connections), self._shed_above):
            return False
        now = ex.conn.loop.time()
        if now < self._next_shed:
            return False
        self._next_shed = now + SHED_EVERY
        self.connection_stats.shed += 1
        return True

    async def _move_to_owner(self, req: Request, ex: Exchange) -> bool:
        """Pass the client's socket and the bytes read of `req` to the owner; False if it must stay here."""
        handoff, conn = self.parts.handoff, ex.conn
        assert handoff is not None and conn.transport is not None
        preface = conn.handover_bytes(req)
        if preface is None:
            return False
        # A duplicate: ours stays valid whatever happens to the connection while we wait.
        fd = os.dup(conn.transport.get_extra_info("socket").fileno())
        try:
            moved = await handoff.send(fd, preface)
        finally:
            os.close(fd)
        if moved:
            conn.handed_over()
        else:
            conn.handover_failed()
        return moved

    def request_done(self, req: Request, ex: Exchange) -> None:
        if ex.conn.moved:
            return  # counted and logged by the process that took the connection
        elapsed = time.perf_counter() - req.started
        status = ex.status or 499  # 499: the client went away before an answer
        self.metrics.observe_request(req.method, status, elapsed, ex.bytes_out)
        if not req.logged_elsewhere:
            self.log_request(req, ex, elapsed)

    def log_request(self, req: Request, ex: Exchange, elapsed: float | None = None) -> None:
        """The request's access-log line (and its recent-errors entry if it failed);
        `elapsed` is the request's time so far when the caller has just read the clock."""
        host, path = _log_host_path(req)
        body = req.body
        status = ex.status or 499
        if status >= 500 or (req.error and status < 400):
            self.metrics.recent_errors.add(
                status=status,
                method=req.method,
                host=host,
                path=path,
                client_ip=req.peer_ip,
                request_id=req.request_id,
                error=req.error or f"status {status}",
            )
        self.access_log.write(
            req.request_id,
            status,
            req.method,
            host,
            path,
            req.peer_ip,
            elapsed if elapsed is not None else time.perf_counter() - req.started,
            ex.bytes_in if ex.bytes_in is not None else body.received if body is not None else 0,
            ex.bytes_out,
            req.log_fields,
        )

    # ---- shutdown --------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Stopping: /readyz says so, no new inference work, and every connection opened
        from now on (taken from the accept queue, handed over by a sibling) is answered
        its first request, waited for within the read timeout, and closes."""
        self.lifecycle.shutting_down = True
        if self.inference is not None:
            self.inference.accepting = False

    async def drain_connections(self, timeout: float) -> int:
        """Ask every connection to finish; abort what is left after `timeout`.

        Returns how many had to be aborted.
        """
        self.begin_shutdown()
        self._all_closed = asyncio.Event()
        if self._busy_meter is not None:
            self._busy_meter.stop()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        left = list(self.connections)
        for conn in left:
            conn.abort()
        self.pool.close_all()
        parts = self.parts
        if parts.relay is not None:
            parts.relay.close()
        if parts.handoff is not None:
            parts.handoff.close()
        if self.inference is not None:
            await self.inference.aclose()
        if parts.budgets is not None:
            await parts.budgets.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()
        self.access_log.flush()
        return len(left)


def _inference_plane_path(path: bytes) -> bool:
    """Endpoints only the inference plane's owner can answer."""
    return path.startswith(b"/v1/") or path == b"/status.json"


SHED_EVERY = 0.01  # seconds between two connections the saturated owner ends

_ABSOLUTE_TARGET = re.compile(rb"(?:.*?://)?([^/]*)(/[^?#]*)?", re.DOTALL)


def _log_host_path(req: Request) -> tuple[str, str]:
    target = req.target
    if req.method == "CONNECT":
        return target.decode("latin-1")[:256], ""
    if target[:1] == b"/":
        host = (req.host_header or b"").decode("latin-1")[:256]
        return host, origin_path(target).decode("latin-1")[:512]
    return _absolute_host_path(target)


@memoized
def _absolute_host_path(target: bytes) -> tuple[str, str]:
    """An absolute-form target's host and path, remembered (memo.py): the same URLs
    come again and again. One regex match instead of a search and a slice per
    part (half the cost): the authority after the first `://` (or from the
    start), and the path to the query or fragment."""
    match = _ABSOLUTE_TARGET.match(target)
    assert match is not None  # every part is optional
    authority, path = match.groups()
    return authority.decode("latin-1")[:256], (path or b"/").decode("latin-1")[:512]
