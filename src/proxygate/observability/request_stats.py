"""Per-request proxy counters as plain integers, turned into metrics at scrape time.

Every request updates three metric families; through prometheus_client's
objects that is three lock acquisitions and label lookups on the hot path.
Here it is a few dict and list operations, and the families
(`proxy_requests_total`, `proxy_requests_by_status_class_total`,
`proxy_request_duration_seconds`, `proxy_response_bytes_total`) are built
when /metrics is read. The event loop is the only writer, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "OTHER"


class RequestStats(Collector):
    def __init__(self) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.buckets: dict[str, list[int]] = {}  # per method: one count per bound, then +Inf
        self.sums: dict[str, float] = {}
        self.response_bytes = 0

    def observe(self, method: str, status: int, seconds: float, bytes_out: int) -> None:
        label = method if method in KNOWN_METHODS else "OTHER"
        key = (label, status)
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        buckets = self.buckets.get(label)
        if buckets is None:
            buckets = self.buckets[label] = [0] * (len(DURATION_BUCKETS) + 1)
            self.sums[label] = 0.0
        buckets[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.sums[label] += seconds
        self.response_bytes += bytes_out

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "proxy_requests", "Requests answered, by method and status", labels=["method", "status"]
        )
        by_class: dict[str, int] = {}
        for (method, status), n in sorted(self.counts.items()):
            requests.add_metric([method, str(status)], n)
            cls = f"{status // 100}xx"
            by_class[cls] = by_class.get(cls, 0) + n
        yield requests
        classes = CounterMetricFamily(
            "proxy_requests_by_status_class", "Requests by status class", labels=["status_class"]
        )
        for cls, n in sorted(by_class.items()):
            classes.add_metric([cls], n)
        yield classes
        duration = HistogramMetricFamily(
            "proxy_request_duration_seconds", "Time from request head to the end of the response", labels=["method"]
        )
        for method, counts in sorted(self.buckets.items()):
            cumulative, running = [], 0
            for bound, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts, strict=True):
                running += n
                cumulative.append((bound, running))
            duration.add_metric([method], cumulative, self.sums[method])
        yield duration
        total = CounterMetricFamily("proxy_response_bytes", "Bytes of HTTP responses sent to clients")
        total.add_metric([], self.response_bytes)
        yield total
