"""Building a `Gateway` from the settings: every per-process part, created once and wired.

The only place that knows how the parts fit together: policies, the
upstream pool, the two planes, the API routes. With `--workers N` a process
that does not own the inference plane gets a relay to the owner instead of
the plane itself.
"""

from __future__ import annotations

from .api import ApiRouter
from .config import GatewaySettings
from .endpoints import Lifecycle, OwnEndpoints
from .gateway import Gateway, Parts
from .http.message import Request
from .http.write_batch import WriteBatch
from .inference.api import SeedInferenceApi
from .inference.handoff import HandoffSender, OwnerLoad, handoff_path
from .inference.metrics import InferenceMetrics
from .inference.openai_api import OpenAiApi
from .inference.placement import build_placement
from .inference.relay import RELAYED_PATHS, InferenceRelay
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
from .proxy.connect import ConnectHandler
from .proxy.dial import Dialer
from .proxy.forward import Forwarder, ForwardProxy
from .proxy.upstream import UpstreamPool
from .status import StatusBoard
from .steering import ConnectionSteering


def build_gateway(
    settings: GatewaySettings,
    *,
    metrics: GatewayMetrics | None = None,
    access_log: AccessLog | None = None,
    limiter: RateLimiter | None = None,
    inference_relay: str = "",
    owner_load: OwnerLoad | None = None,
    steering: ConnectionSteering | None = None,
) -> Gateway:
    """One process's gateway; `inference_relay` is the owner's socket when another process owns the plane,
    `owner_load` the owner's connection count shared by every process (`--workers N`), `steering`
    the owner's say in where the kernel sends new connections."""
    metrics = metrics or GatewayMetrics()
    writes = WriteBatch()  # one per process: small writes of a loop pass go out together
    blocklist = BlocklistFile(settings.blocklist)
    dialer = Dialer(DestinationPolicy.from_settings(settings), settings.dial_timeout)
    pool = UpstreamPool(dialer, settings.upstream_idle_per_host, settings.idle_timeout, writes)
    limiter = limiter if limiter is not None else build_limiter(settings)
    rate_limit = None
    if limiter is not None:
        identity = ClientIdentity(settings.trusted_proxies, settings.rate_limit_ipv6_prefix)
        rate_limit = RateLimitPolicy(limiter, identity, metrics, fail_open=settings.rate_limit_on_error == "open")
    keys = KeyFile(settings.api_keys) if settings.api_keys else None
    access = AccessPolicy(settings.allow_clients, keys, proxy_auth=settings.proxy_auth == "keys")
    api = ApiRouter()
    parts = Parts(
        settings=settings,
        metrics=metrics,
        access_log=access_log or AccessLog(settings.log_format),
        writes=writes,
        blocklist=blocklist,
        dialer=dialer,
        pool=pool,
        limiter=limiter,
        rate_limit=rate_limit,
        keys=keys,
        access=access,
        api=api,
        forward_proxy=ForwardProxy(blocklist, dialer, Forwarder(pool, settings.read_timeout), metrics),
        connect=ConnectHandler(blocklist, dialer, metrics, settings.idle_timeout),
        lifecycle=Lifecycle(),
        owner_load=owner_load,
        steering=steering,
    )
    if inference_relay:
        # Another process owns the inference plane: connections with inference
        # requests move to it when they can, the rest are relayed.
        parts.handoff = HandoffSender(handoff_path(inference_relay), owner_load)
        timeout = settings.queue_timeout + settings.inference_timeout if settings.inference_timeout else 0
        parts.relay = InferenceRelay(inference_relay, writes, timeout)
        for path in RELAYED_PATHS:
            api.add(path.decode(), ("GET",) if path == b"/v1/models" else ("POST",), parts.relay.handle)
    else:
        _add_inference_plane(parts)
    # The status page is served everywhere; its data comes from the inference
    # plane's owner, which alone sees the workers and the queue.
    board = StatusBoard(settings, metrics, parts.inference)
    OwnEndpoints(metrics, board, parts.lifecycle).register(
        api, status_json=parts.relay.handle if parts.relay is not None else None
    )
    return Gateway(parts)


def _add_inference_plane(parts: Parts) -> None:
    settings = parts.settings
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
        InferenceMetrics(parts.metrics.registry),
        routes=RoutesFile(settings.routes),
        placement=build_placement(settings.routing_policy),
        coalesce=settings.coalesce,
    )
    access = parts.access

    def key_of(req: Request) -> ApiKey | None:
        return access.key_named(req.tenant)

    if parts.keys is not None:
        store = parts.limiter if parts.limiter is not None else MemoryLimiter(BucketSpec(1, 1.0))
        parts.budgets = Budgets(store, fail_open=settings.rate_limit_on_error == "open")
    tenants = TenantGate(key_of, parts.budgets, service.metrics)
    api = parts.api
    seed_api = SeedInferenceApi(service, settings.max_tokens_limit, settings.max_prompt_bytes, tenants)
    api.add("/v1/inference", ("POST",), seed_api.handle)
    openai = OpenAiApi(service, settings.max_tokens_limit, settings.max_prompt_bytes, tenants)
    api.add("/v1/models", ("GET",), openai.models)
    api.add("/v1/completions", ("POST",), openai.completions)
    api.add("/v1/chat/completions", ("POST",), openai.chat_completions)
    parts.inference = service
