"""What `/status.json` reports: one snapshot of the whole gateway.

Counters come from the metrics (every serving process merged, as /metrics
serves them), the workers and the queue from the inference plane, and the
recent errors from every process. Rates are the counters' growth over the
last `WINDOW` seconds, from samples taken whenever the page asks (about once
a second while someone watches); the first answer has no rates yet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..inference.status import plane_status
from ..observability.metrics_exchange import Family
from ..observability.recent_errors import latest

if TYPE_CHECKING:
    from ..config import GatewaySettings
    from ..inference.service import InferenceService
    from ..observability.metrics import GatewayMetrics

WINDOW = 10.0
Totals = dict[str, float]


def page() -> bytes:
    """The self-contained HTML page (inline style and script, no external assets)."""
    return resources.files(__package__).joinpath("page.html").read_bytes()


class StatusBoard:
    def __init__(
        self,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        inference: InferenceService | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.inference = inference
        self._clock = clock
        self._wall = wall
        self._started = wall()
        self._samples: deque[tuple[float, Totals]] = deque()

    def snapshot(self) -> dict[str, Any]:
        families, errors = self.metrics.families_and_errors()
        totals = counter_totals(families)
        now = self._clock()
        rates, window = self._rates(now, totals)
        out: dict[str, Any] = {
            "time": round(self._wall(), 3),
            "uptime_s": round(self._wall() - self._started, 1),
            "processes": self.settings.workers,
            "listen": f"{self.settings.listen[0] or '*'}:{self.settings.listen[1]}",
            "routing_policy": self.settings.routing_policy,
            "totals": totals,
            "rates": rates,
            "rate_window_s": round(window, 2),
            "connections": {
                "open": total(families, "proxy_active_connections"),
                "tunnels": total(families, "proxy_active_tunnels"),
            },
            "limiter": {
                "rejected_by_endpoint": by_label(families, "rate_limited_requests_total", "endpoint"),
                "budget_rejected_by_tenant": by_label(families, "inference_budget_rejections_total", "tenant"),
            },
            "recent_errors": latest(errors),
        }
        if self.inference is not None:
            out.update(plane_status(self.inference))
        else:
            out.update({"workers": [], "queue": {"depth": 0, "by_model": {}}, "in_flight": 0, "routes": []})
        return out

    def _rates(self, now: float, totals: Totals) -> tuple[Totals, float]:
        """Per-second growth of each total since the oldest sample within the window."""
        samples = self._samples
        while samples and now - samples[0][0] > WINDOW:
            samples.popleft()
        if not samples or now - samples[-1][0] >= 0.5:
            samples.append((now, totals))
        then, before = samples[0]
        span = now - then
        if span <= 0:
            return dict.fromkeys(totals, 0.0), 0.0
        return {k: round(max(0.0, v - before.get(k, 0.0)) / span, 3) for k, v in totals.items()}, span


def _samples(families: Iterable[Family], sample_name: str) -> Iterable[tuple[dict[str, str], float]]:
    for fam in families:
        for name, labels, value in fam["samples"]:
            if name == sample_name:
                yield labels, value


def counter_totals(families: list[Family]) -> Totals:
    """The counters the page shows, summed over their labels."""
    requests = errors = 0.0
    for labels, value in _samples(families, "proxy_requests_total"):
        requests += value
        if labels.get("status", "").startswith("5"):
            errors += value
    inference = inference_errors = 0.0
    for labels, value in _samples(families, "inference_requests_total"):
        inference += value
        if labels.get("status") in ("error", "timeout"):
            inference_errors += value
    return {
        "requests": requests,
        "errors_5xx": errors,
        "inference_requests": inference,
        "inference_errors": inference_errors,
        "tokens": total(families, "inference_tokens_total"),
        "prompt_tokens": total(families, "inference_prompt_tokens_total"),
        "cached_tokens": total(families, "inference_cached_tokens_total"),
        "coalesced": total(families, "inference_coalesced_requests_total"),
        "rate_limited": total(families, "rate_limited_requests_total"),
        "budget_rejected": total(families, "inference_budget_rejections_total"),
        "blocked": total(families, "proxy_blocked_requests_total"),
        "denied": total(families, "proxy_denied_requests_total"),
        "tunnels": total(families, "proxy_tunnels_total"),
    }


def total(families: list[Family], sample_name: str) -> float:
    """One sample summed over its labels."""
    return float(sum(v for _, v in _samples(families, sample_name)))


def by_label(families: list[Family], sample_name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in _samples(families, sample_name):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out
