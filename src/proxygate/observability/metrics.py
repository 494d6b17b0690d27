"""Every metric the gateway exports, on one registry created per gateway.

Names, labels and buckets of the seed are kept (docs/contract.md, "Metrics"); label
values come from bounded sets only. The per-request families live in
`RequestStats`, and the connection and tunnel ones in `ConnectionStats`
(plain counters exported at scrape time); the rest are
prometheus_client objects updated off the hot path.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from .connection_stats import ConnectionStats
from .metrics_exchange import ErrorEntry, Family, MetricsExchange, snapshot
from .recent_errors import RecentErrors
from .request_stats import RequestStats, method_label

__all__ = ["ENDPOINT_CLASSES", "GatewayMetrics", "method_label"]

ENDPOINT_CLASSES = ("proxy", "connect", "inference", "openai", "other")


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None, exchange: MetricsExchange | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # Set when several processes serve the listener: /metrics covers them all.
        self.exchange = exchange
        r = self.registry
        self.request_stats = RequestStats()
        r.register(self.request_stats)
        self.connection_stats = ConnectionStats()
        r.register(self.connection_stats)
        self.blocked = Counter("proxy_blocked_requests_total", "Requests refused by the blocklist", registry=r)
        self.denied = Counter(
            "proxy_denied_requests_total", "Requests refused by destination policy", ["rule"], registry=r
        )
        self.upstream_errors = Counter(
            "proxy_upstream_errors_total", "Failures reaching an origin", ["kind"], registry=r
        )
        self.rate_limited = Counter(
            "rate_limited_requests_total", "Requests refused by the rate limiter", ["endpoint"], registry=r
        )
        for endpoint in ENDPOINT_CLASSES:
            self.rate_limited.labels(endpoint)
        self.rate_limiter_errors = Counter(
            "rate_limiter_errors_total", "Rate-limit checks that failed (store unreachable or slow)", registry=r
        )
        self.handoffs = Counter(
            "inference_handoffs_total",
            "Client connections with an inference request that a serving process passed to the inference "
            "plane's owner (moved) or, when it could not, relayed (--workers N)",
            ["result"],
            registry=r,
        )
        self.observe_request = self.request_stats.observe
        self.recent_errors = RecentErrors()

    async def refresh(self) -> None:
        """Before a scrape: the other processes publish what they have counted up to now."""
        if self.exchange is not None:
            await self.exchange.requests.refresh()

    def render(self) -> bytes:
        if self.exchange is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry(auto_describe=False)
        merged.register(self.exchange.merged(self.registry))
        return generate_latest(merged)

    def families_and_errors(self) -> tuple[list[Family], list[ErrorEntry]]:
        """Every metric as plain data and every recent error, all processes merged
        (others' as of their last publish; `refresh` first for now): what the status page reads."""
        if self.exchange is None:
            return snapshot(self.registry), self.recent_errors.entries()
        return self.exchange.merged_with_errors(self.registry, self.recent_errors.entries())

    def publish(self) -> None:
        """Hand this process's metrics and recent errors to the others (several processes only)."""
        if self.exchange is not None:
            self.exchange.publish(self.registry, self.recent_errors.entries())

    def answer_refreshes(self, loop: asyncio.AbstractEventLoop) -> None:
        """Publish whenever another process is about to answer a scrape (several processes only)."""
        if self.exchange is not None:
            self.exchange.requests.start(loop, self.publish)

    def stop_answering(self) -> None:
        if self.exchange is not None:
            self.exchange.requests.close()
