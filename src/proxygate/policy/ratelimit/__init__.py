"""Rate limiting: one policy step in front of every request, two bucket stores.

`RateLimitPolicy.admit` names the client (`ClientIdentity`), asks the store
(`MemoryLimiter` or `RedisLimiter`, same leaky-bucket semantics) and either
returns the decision (its headers go on the response) or raises 429. When the
shared store fails it fails open or closed as configured, logging once per
outage rather than once per request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NoReturn, Protocol

from ...config import GatewaySettings
from ...errors import ServiceUnavailable, TooManyRequests
from ...http.message import Request
from ...observability.metrics import GatewayMetrics
from ..identity import ClientIdentity
from .bucket import BucketSpec, Decision
from .memory import MemoryLimiter
from .redis_store import LimiterUnavailable, RedisLimiter
from .shared import SharedMemoryLimiter

log = logging.getLogger("proxygate.ratelimit")

__all__ = [
    "BucketSpec",
    "Decision",
    "LimiterUnavailable",
    "MemoryLimiter",
    "RateLimitPolicy",
    "RateLimiter",
    "RedisLimiter",
    "build_limiter",
]


class RateLimiter(Protocol):
    name: str

    async def check(self, key: str) -> Decision: ...

    async def charge(self, key: str, spec: BucketSpec, cost: float, force: bool) -> tuple[bool, float]:
        """Any bucket shape and cost (API key budgets); `check` is charge(key, the store's spec, 1)."""
        ...

    async def aclose(self) -> None: ...


def build_limiter(settings: GatewaySettings, *, processes: int = 1) -> RateLimiter | None:
    """The store `settings` ask for; with several processes the memory store
    lives in shared memory (make it before they fork)."""
    spec = BucketSpec.per_minute(settings.rate_limit, settings.rate_burst)
    if settings.limiter == "none":
        return None
    if settings.limiter == "redis":
        return RedisLimiter(spec, settings.redis_addr, settings.redis_timeout)
    if processes > 1:
        return SharedMemoryLimiter(spec, settings.rate_limit_max_clients)
    return MemoryLimiter(spec, settings.rate_limit_max_clients)


class RateLimitPolicy:
    def __init__(
        self,
        limiter: RateLimiter,
        identity: ClientIdentity,
        metrics: GatewayMetrics,
        fail_open: bool = True,
    ) -> None:
        self.limiter = limiter
        self.identity = identity
        self.metrics = metrics
        self.fail_open = fail_open
        self._outage = False
        # In-process stores answer on the spot: no coroutine per request.
        self.charge_now: Callable[[str, BucketSpec, float, bool], tuple[bool, float]] | None = getattr(
            limiter, "charge_now", None
        )
        self._spec: BucketSpec | None = getattr(limiter, "spec", None)
        self._peer_keyed = identity.is_peer_address

    def admit_now(self, req: Request, endpoint: str) -> bytes:
        """`admit` for a store with `charge_now` (memory, shared memory): the admitted
        request's X-RateLimit-* header lines, or 429. No `Decision` is made for an
        admitted request (a third of the check's cost)."""
        assert self.charge_now is not None and self._spec is not None
        spec = self._spec
        allowed, level = self.charge_now(self._key(req), spec, 1.0, False)
        if not allowed:
            self._refuse(spec.decision(False, level), endpoint)
        return spec.head_lines(level)

    async def admit(self, req: Request, endpoint: str) -> Decision | None:
        """The decision for an admitted request (None if the store is down and we fail open)."""
        try:
            decision = await self.limiter.check(self._key(req))
        except LimiterUnavailable as exc:
            self.metrics.rate_limiter_errors.inc()
            if not self._outage:
                self._outage = True
                log.error(
                    "rate limiter store unavailable (%s); failing %s until it recovers",
                    exc,
                    "open" if self.fail_open else "closed",
                )
            if self.fail_open:
                return None
            raise ServiceUnavailable("rate limiter unavailable", headers=[(b"Retry-After", b"1")]) from None
        if self._outage:
            self._outage = False
            log.warning("rate limiter store recovered")
        return self._verdict(decision, endpoint)

    def _key(self, req: Request) -> str:
        if req.tenant:
            return "key:" + req.tenant  # an API key names the client, wherever it connects from
        return req.peer_ip if self._peer_keyed else self.identity.key(req.peer_ip, req.headers)

    def _verdict(self, decision: Decision, endpoint: str) -> Decision:
        """`decision` if it admits; else counted and raised as 429."""
        if not decision.allowed:
            self._refuse(decision, endpoint)
        return decision

    def _refuse(self, decision: Decision, endpoint: str) -> NoReturn:
        self.metrics.rate_limited.labels(endpoint).inc()
        raise TooManyRequests("rate limit exceeded", headers=decision.headers())
