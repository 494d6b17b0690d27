"""The status page's data: totals from the metrics, rates over a window, recent errors (no processes)."""

from __future__ import annotations

from proxygate.config import GatewaySettings
from proxygate.observability.metrics import GatewayMetrics
from proxygate.observability.recent_errors import RecentErrors, latest
from proxygate.status.board import WINDOW, StatusBoard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_totals_and_rates_over_the_window() -> None:
    metrics, clock = GatewayMetrics(), Clock()
    board = StatusBoard(GatewaySettings(), metrics, None, clock=clock, wall=clock)
    for status in (200, 200, 502, 503):
        metrics.observe_request("GET", status, 0.01, 10)
    first = board.snapshot()
    assert first["totals"]["requests"] == 4 and first["totals"]["errors_5xx"] == 2
    assert first["rate_window_s"] == 0 and first["rates"]["requests"] == 0  # nothing to compare with yet
    clock.now += 2
    for _ in range(10):
        metrics.observe_request("GET", 200, 0.01, 10)
    metrics.rate_limited.labels("proxy").inc(4)
    s = board.snapshot()
    assert s["rates"]["requests"] == 5.0 and s["rates"]["rate_limited"] == 2.0 and s["rates"]["errors_5xx"] == 0
    assert s["limiter"]["rejected_by_endpoint"]["proxy"] == 4
    # Samples older than the window are dropped: the rate is of recent traffic only.
    clock.now += WINDOW + 1
    board.snapshot()
    clock.now += 1
    assert board.snapshot()["rates"]["requests"] == 0
    assert board.snapshot()["workers"] == [] and board.snapshot()["queue"]["depth"] == 0


def test_recent_errors_are_bounded_and_newest_first() -> None:
    clock = Clock()
    errors = RecentErrors(keep=3, clock=clock)
    for i in range(5):
        clock.now += 1
        errors.add(status=502, method="GET", host="h", path=f"/{i}", client_ip="c", request_id=str(i), error="x" * 500)
    kept = errors.entries()
    assert [e["path"] for e in kept] == ["/2", "/3", "/4"]
    assert len(kept[0]["error"]) == 300
    other = [{**kept[0], "time": 104.5, "path": "/peer"}]
    assert [e["path"] for e in latest(kept + other, keep=2)] == ["/4", "/peer"]
