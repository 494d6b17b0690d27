"""Every metric the gateway exports, on one registry created per gateway.

Names, labels and buckets of the seed are kept (DESIGN.md "Metrics"); label
values come from bounded sets only. Label children are cached so the hot path
does one dict lookup and one increment per metric.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
ENDPOINT_CLASSES = ("proxy", "connect", "inference", "openai", "other")
_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "proxy_requests_total", "Requests answered, by method and status", ["method", "status"], registry=r
        )
        self.blocked = Counter("proxy_blocked_requests_total", "Requests refused by the blocklist", registry=r)
        self.duration = Histogram(
            "proxy_request_duration_seconds",
            "Time from request head to the end of the response",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.active_connections = Gauge("proxy_active_connections", "Open client connections", registry=r)
        self.by_status_class = Counter(
            "proxy_requests_by_status_class_total", "Requests by status class", ["status_class"], registry=r
        )
        self.denied = Counter(
            "proxy_denied_requests_total", "Requests refused by destination policy", ["rule"], registry=r
        )
        self.upstream_errors = Counter(
            "proxy_upstream_errors_total", "Failures reaching an origin", ["kind"], registry=r
        )
        self.tunnels = Counter("proxy_tunnels_total", "CONNECT tunnels, by how they ended", ["result"], registry=r)
        self.active_tunnels = Gauge("proxy_active_tunnels", "Open CONNECT tunnels", registry=r)
        self.tunnel_bytes = Counter(
            "proxy_tunnel_bytes_total", "Bytes relayed through tunnels", ["direction"], registry=r
        )
        self.bytes = Counter("proxy_response_bytes_total", "Bytes of HTTP responses sent to clients", registry=r)
        self.rate_limited = Counter(
            "rate_limited_requests_total", "Requests refused by the rate limiter", ["endpoint"], registry=r
        )
        for endpoint in ENDPOINT_CLASSES:
            self.rate_limited.labels(endpoint)
        self.rate_limiter_errors = Counter(
            "rate_limiter_errors_total", "Rate-limit checks that failed (store unreachable or slow)", registry=r
        )
        self._request_children: dict[tuple[str, int], tuple[Counter, Counter, Histogram]] = {}

    def observe_request(self, method: str, status: int, seconds: float, bytes_out: int) -> None:
        key = (method, status)
        children = self._request_children.get(key)
        if children is None:
            label = method_label(method)
            children = (
                self.requests.labels(label, str(status)),
                self.by_status_class.labels(f"{status // 100}xx"),
                self.duration.labels(label),
            )
            if len(self._request_children) < 2048:
                self._request_children[key] = children
        children[0].inc()
        children[1].inc()
        children[2].observe(seconds)
        if bytes_out:
            self.bytes.inc(bytes_out)

    def render(self) -> bytes:
        return generate_latest(self.registry)
