"""The gateway application: one object owning all per-process state.

It decides what each request is (CONNECT tunnel, absolute-form proxy request,
or a call to our own API), applies the blocklist and destination policy, and
records one access-log line and the metrics when a request is done.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Coroutine
from typing import Any

from .api import ApiRouter, origin_path
from .config import GatewaySettings
from .errors import BadRequest, DestinationDenied, HttpError
from .http.connection import ClientConnection
from .http.message import Request
from .http.write_batch import WriteBatch
from .inference.api import SeedInferenceApi
from .inference.handoff import HandoffSender, handoff_path
from .inference.metrics import InferenceMetrics
from .inference.openai_api import OpenAiApi, error_body
from .inference.placement import build_placement
from .inference.relay import RELAYED_PATHS, InferenceRelay, RelayedApi
from .inference.routes import RoutesFile
from .inference.service import InferenceLimits, InferenceService
from .inference.tenancy import TenantGate
from .observability.logging import AccessLog
from .observability.metrics import GatewayMetrics
from .policy.access import AccessPolicy
from .policy.blocklist import BlocklistFile
from .policy.budgets import Budgets
from .policy.destinations import DestinationPolicy
from .policy.identity import ClientIdentity
from .policy.keys import ApiKey, KeyFile
from .policy.ratelimit import BucketSpec, MemoryLimiter, RateLimiter, RateLimitPolicy, build_limiter
from .proxy.connect import open_tunnel, parse_authority
from .proxy.dial import Dialer
from .proxy.forward import Forwarder, Target, block_page
from .proxy.upstream import UpstreamPool
from .status import StatusBoard, page
from .watched_file import WatchedFile

log = logging.getLogger("proxygate.gateway")


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        metrics: GatewayMetrics | None = None,
        access_log: AccessLog | None = None,
        limiter: RateLimiter | None = None,
        inference_relay: str = "",
    ) -> None:
        self.settings = settings
        self.metrics = metrics or GatewayMetrics()
        self.access_log = access_log or AccessLog(settings.log_format)
        self.blocklist = BlocklistFile(settings.blocklist)
        self.policy = DestinationPolicy.from_settings(settings)
        self.dialer = Dialer(self.policy, settings.dial_timeout)
        # One per process: small writes of a loop pass go out together.
        self.writes = WriteBatch()
        self.pool = UpstreamPool(self.dialer, settings.upstream_idle_per_host, settings.idle_timeout, self.writes)
        self.forwarder = Forwarder(self.pool, settings.read_timeout)
        self.limiter = limiter if limiter is not None else build_limiter(settings)
        self.rate_limit = (
            RateLimitPolicy(
                self.limiter,
                ClientIdentity(settings.trusted_proxies, settings.rate_limit_ipv6_prefix),
                self.metrics,
                fail_open=settings.rate_limit_on_error == "open",
            )
            if self.limiter is not None
            else None
        )
        self.keys = KeyFile(settings.api_keys) if settings.api_keys else None
        self.access = AccessPolicy(settings.allow_clients, self.keys, proxy_auth=settings.proxy_auth == "keys")
        self.connections: set[ClientConnection] = set()
        self.shutting_down = False
        self.ready = False
        self.api = ApiRouter()
        self.api.add("/metrics", ("GET",), self._metrics)
        self.api.add("/healthz", ("GET",), self._healthz)
        self.api.add("/readyz", ("GET",), self._readyz)
        self.inference: InferenceService | None = None
        self.budgets: Budgets | None = None
        self.relay: InferenceRelay | None = None
        self.handoff: HandoffSender | None = None
        if inference_relay:
            # Connections with inference requests move to the owner when they can;
            # the rest are relayed.
            self.handoff = HandoffSender(handoff_path(inference_relay))
            # Another process owns the inference plane: relay /v1/* to it.
            timeout = settings.queue_timeout + settings.inference_timeout if settings.inference_timeout else 0
            self.relay = InferenceRelay(inference_relay, self.writes, timeout)
            for path in RELAYED_PATHS:
                self.api.add(path.decode(), ("GET",) if path == b"/v1/models" else ("POST",), self.relay.handle)
        else:
            self.inference = self._inference_plane(settings)
        # The status page is served here; its data comes from the inference
        # plane's owner, which alone sees the workers and the queue.
        self.status = StatusBoard(settings, self.metrics, self.inference)
        self._status_html = page()
        self.api.add("/status", ("GET",), self._status_page)
        self.api.add("/status.json", ("GET",), self.relay.handle if self.relay is not None else self._status_json)
        self._all_closed: asyncio.Event | None = None

    def _inference_plane(self, settings: GatewaySettings) -> InferenceService:
        service = InferenceService(
            settings.worker_addrs,
            InferenceLimits(
                max_queue=settings.max_queue,
                queue_timeout=settings.queue_timeout,
                inference_timeout=settings.inference_timeout,
                health_interval=settings.health_interval,
                health_timeout=settings.health_timeout,
                eject_after=settings.worker_eject_after,
                queue_aging=settings.queue_aging,
                token_timeout=settings.token_timeout,
            ),
            InferenceMetrics(self.metrics.registry),
            routes=RoutesFile(settings.routes),
            placement=build_placement(settings.routing_policy),
            coalesce=settings.coalesce,
        )

        def key_of(req: Request) -> ApiKey | None:
            return self.access.key_named(req.tenant)

        budgets = None
        if self.keys is not None:
            store = self.limiter if self.limiter is not None else MemoryLimiter(BucketSpec(1, 1.0))
            budgets = Budgets(store, fail_open=settings.rate_limit_on_error == "open")
        self.budgets = budgets
        tenants = TenantGate(key_of, budgets, service.metrics)
        seed_api = SeedInferenceApi(service, settings.max_tokens_limit, settings.max_prompt_bytes, tenants)
        self.api.add("/v1/inference", ("POST",), seed_api.handle)
        openai = OpenAiApi(service, settings.max_tokens_limit, settings.max_prompt_bytes, tenants)
        self.api.add("/v1/models", ("GET",), openai.models)
        self.api.add("/v1/completions", ("POST",), openai.completions)
        self.api.add("/v1/chat/completions", ("POST",), openai.chat_completions)
        return service

    def relayed_api(self) -> RelayedApi:
        """The application serving sibling processes' relayed /v1/* requests (owner only)."""
        return RelayedApi(self.settings, self.writes, self.api, self, self.log_request)

    def bound(self, port: int) -> None:
        """The listener is up on `port` (known only now when asked for port 0)."""
        self.policy = DestinationPolicy.from_settings(self.settings, bound_port=port)
        self.dialer.policy = self.policy
        if self.inference is not None:
            self.inference.start()
        self.ready = True

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
        self.metrics.active_connections.inc()

    def connection_closed(self, conn: ClientConnection) -> None:
        self.untrack(conn)
        self.metrics.active_connections.dec()

    def track(self, conn: ClientConnection) -> None:
        """A connection that shutdown waits for (a client's, or a relayed one)."""
        self.connections.add(conn)

    def untrack(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if self._all_closed is not None and not self.connections:
            self._all_closed.set()

    # ---- dispatch ------------------------------------------------------------

    async def handle(self, req: Request, conn: ClientConnection) -> None:
        if req.method == "CONNECT":
            host, port = parse_authority(req.target)
            self.access.check_proxy(req)
            if (pending := self._rate_limit(req, "connect")) is not None:
                await pending
            await self._connect(req, host, port, conn)
            return
        if req.target[:1] == b"/":
            path = origin_path(req.target)
            if self.handoff is not None and _inference_plane_path(path) and await self._hand_off(req, conn):
                return
            await self._api(req, path, conn)
            return
        if not req.is_absolute_form:
            if req.target == b"*" and req.method == "OPTIONS":
                conn.send(200, [(b"Allow", b"GET, HEAD, POST, CONNECT, OPTIONS")])
                return
            raise BadRequest("request target must be a path, an absolute http:// URL, or host:port for CONNECT")
        target = Target(req.target)
        if self.policy.names_own_listener(target.host, target.port):
            await self._api(req, origin_path(target.path), conn)
            return
        self.access.check_proxy(req)
        if (pending := self._rate_limit(req, "proxy")) is not None:
            await pending
        if self.blocklist.current.is_blocked(target.host):
            self.metrics.blocked.inc()
            conn.send(403, [(b"Content-Type", b"text/html; charset=utf-8")], block_page(target.host))
            return
        if req.upgrade:
            # Protocol upgrades are not relayed: the request goes through as
            # plain HTTP, and the connection ends after it.
            conn.close_after = True
        try:
            self.policy.check_http_port(target.port)
            await self.forwarder.forward(req, target, conn)
        except DestinationDenied:
            self.metrics.denied.labels("destination").inc()
            raise
        except HttpError as exc:
            self.metrics.upstream_errors.labels(str(exc.status)).inc()
            raise

    async def _api(self, req: Request, path: bytes, conn: ClientConnection) -> None:
        """Our own endpoints. Every error on `/v1/*` is in OpenAI's JSON shape, as its clients expect."""
        if not path.startswith(b"/v1/"):
            if (pending := self._rate_limit(req, self._endpoint(path))) is not None:
                await pending
            await self.api.dispatch(req, path, conn)
            return
        try:
            self.access.check_api(req)
            if (pending := self._rate_limit(req, self._endpoint(path))) is not None:
                await pending
            await self.api.dispatch(req, path, conn)
        except HttpError as exc:
            if conn.response_started:
                raise
            req.error = exc.reason
            conn.send(
                exc.status, [(b"Content-Type", b"application/json"), *exc.headers], error_body(exc.status, exc.reason)
            )

    def _endpoint(self, path: bytes) -> str:
        """The rate-limit class of an origin-form path ("" = exempt)."""
        if path in _HEALTH_PATHS and not self.settings.rate_limit_health:
            return ""
        if path == b"/v1/inference":
            return "inference"
        if path.startswith(b"/v1/"):
            return "openai"
        return "other"

    def _rate_limit(self, req: Request, endpoint: str) -> Coroutine[Any, Any, None] | None:
        """Admit `req` or raise 429: decided on the spot (None) for in-process
        stores, else a coroutine the caller awaits (Redis)."""
        policy = self.rate_limit
        if policy is None or not endpoint:
            return None
        if policy.check_now is not None:
            req.extra_head = policy.admit_now(req, endpoint).head_lines()
            return None
        return self._rate_limit_remote(policy, req, endpoint)

    async def _rate_limit_remote(self, policy: RateLimitPolicy, req: Request, endpoint: str) -> None:
        decision = await policy.admit(req, endpoint)
        if decision is not None:
            req.extra_head = decision.head_lines()

    async def _hand_off(self, req: Request, conn: ClientConnection) -> bool:
        """Move the connection to the inference plane's owner; False if it must stay here."""
        assert self.handoff is not None and conn.transport is not None
        preface = conn.handover_bytes(req)
        if preface is None:
            self.metrics.handoffs.labels("relayed").inc()
            return False
        # A duplicate: ours stays valid whatever happens to the connection while we wait.
        fd = os.dup(conn.transport.get_extra_info("socket").fileno())
        try:
            moved = await self.handoff.send(fd, preface)
        finally:
            os.close(fd)
        if moved:
            conn.handed_over()
        else:
            conn.handover_failed()
        self.metrics.handoffs.labels("moved" if moved else "relayed").inc()
        return moved

    async def _connect(self, req: Request, host: str, port: int, conn: ClientConnection) -> None:
        conn.close_after = True
        if self.blocklist.current.is_blocked(host):
            self.metrics.blocked.inc()
            conn.send(403, [])
            return
        try:
            self.policy.check_connect_port(port)
            tunnel = await open_tunnel(req, host, port, conn, self.dialer, self.settings.idle_timeout)
        except DestinationDenied:
            self.metrics.denied.labels("connect").inc()
            self.metrics.tunnels.labels("denied").inc()
            raise
        except HttpError:
            self.metrics.tunnels.labels("dial_failed").inc()
            raise
        self.metrics.active_tunnels.inc()
        try:
            why = await tunnel.done
        finally:
            self.metrics.active_tunnels.dec()
            self.metrics.tunnel_bytes.labels("up").inc(tunnel.bytes_up)
            self.metrics.tunnel_bytes.labels("down").inc(tunnel.bytes_down)
        self.metrics.tunnels.labels("idle_timeout" if why == "idle timeout" else "closed").inc()
        conn.bytes_out = tunnel.bytes_down
        req.content_length = tunnel.bytes_up

    def request_done(self, req: Request, conn: ClientConnection) -> None:
        if conn.moved:
            return  # counted and logged by the process that took the connection
        elapsed = time.perf_counter() - req.started
        status = conn.status or 499  # 499: the client went away before an answer
        self.metrics.observe_request(req.method, status, elapsed, conn.bytes_out)
        if not req.logged_elsewhere:
            self.log_request(req, conn)

    def log_request(self, req: Request, conn: ClientConnection) -> None:
        """The request's access-log line (and its recent-errors entry if it failed)."""
        host, path = _log_host_path(req)
        body = req.body
        status = conn.status or 499
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
            request_id=req.request_id,
            status=status,
            method=req.method,
            host=host,
            path=path,
            client_ip=req.peer_ip,
            duration_ms=(time.perf_counter() - req.started) * 1000.0,
            bytes_in=body.received if body is not None else (req.content_length or 0),
            bytes_out=conn.bytes_out,
            fields=req.log_fields,
        )

    # ---- our own endpoints ---------------------------------------------------

    async def _metrics(self, req: Request, conn: ClientConnection) -> None:
        conn.send(200, [(b"Content-Type", self.metrics.content_type.encode())], self.metrics.render())

    async def _status_page(self, req: Request, conn: ClientConnection) -> None:
        conn.send(
            200, [(b"Content-Type", b"text/html; charset=utf-8"), (b"Cache-Control", b"no-store")], self._status_html
        )

    async def _status_json(self, req: Request, conn: ClientConnection) -> None:
        body = json.dumps(self.status.snapshot(), separators=(",", ":")).encode()
        conn.send(200, [(b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store")], body)

    async def _healthz(self, req: Request, conn: ClientConnection) -> None:
        conn.send(200, [(b"Content-Type", b"application/json")], b'{"status":"ok"}\n')

    async def _readyz(self, req: Request, conn: ClientConnection) -> None:
        if self.ready and not self.shutting_down:
            conn.send(200, [(b"Content-Type", b"application/json")], b'{"status":"ready"}\n')
        else:
            state = b"shutting down" if self.shutting_down else b"starting"
            conn.send(
                503, [(b"Content-Type", b"application/json"), (b"Retry-After", b"5")], b'{"status":"%s"}\n' % state
            )

    # ---- shutdown --------------------------------------------------------------

    async def drain_connections(self, timeout: float) -> int:
        """Ask every connection to finish; abort what is left after `timeout`.

        Returns how many had to be aborted.
        """
        self.shutting_down = True
        if self.inference is not None:
            self.inference.accepting = False
        self._all_closed = asyncio.Event()
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
        if self.relay is not None:
            self.relay.close()
        if self.handoff is not None:
            self.handoff.close()
        if self.inference is not None:
            await self.inference.aclose()
        if self.budgets is not None:
            await self.budgets.aclose()
        if self.limiter is not None:
            await self.limiter.aclose()
        self.access_log.flush()
        return len(left)


def _inference_plane_path(path: bytes) -> bool:
    """Endpoints only the inference plane's owner can answer."""
    return path.startswith(b"/v1/") or path == b"/status.json"


_HEALTH_PATHS = frozenset({b"/metrics", b"/healthz", b"/readyz", b"/status", b"/status.json"})


def _log_host_path(req: Request) -> tuple[str, str]:
    target = req.target
    if req.method == "CONNECT":
        return target.decode("latin-1")[:256], ""
    if target[:1] == b"/":
        host = (req.host_header or b"").decode("latin-1")[:256]
        return host, origin_path(target).decode("latin-1")[:512]
    scheme_end = target.find(b"://")
    rest = target[scheme_end + 3 :] if scheme_end != -1 else target
    slash = rest.find(b"/")
    authority = rest if slash == -1 else rest[:slash]
    path = b"/" if slash == -1 else origin_path(rest[slash:])
    return authority.decode("latin-1")[:256], path.decode("latin-1")[:512]
