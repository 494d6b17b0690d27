"""The seed's inference metrics (names, labels, buckets), plus worker gauges.

Label values are bounded: `model` is a model some worker reported, the seed's
`default-model`, or `other`; `worker_id` is an address from -worker-addrs;
`priority` is high/medium/low.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from .workers import WorkerClient

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
QUEUE_WAIT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.requests = Counter(
            "inference_requests_total", "Inference requests by outcome", ["model", "priority", "status"], registry=r
        )
        self.duration = Histogram(
            "inference_request_duration_seconds",
            "Submission to last token",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "inference_time_to_first_token_seconds",
            "Submission to first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("inference_tokens_total", "Tokens streamed to clients", ["model"], registry=r)
        self.processing = Histogram(
            "inference_processing_seconds",
            "Dispatch to end of the worker call",
            ["model", "worker_id"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "inference_queue_wait_seconds",
            "Submission to dispatch",
            ["model", "priority"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.worker_requests = Counter(
            "inference_worker_requests_total", "Worker calls by outcome", ["worker_id", "status"], registry=r
        )
        self.queue_depth = Gauge("inference_queue_depth", "Requests waiting for a worker", registry=r)
        self.in_flight = Gauge("inference_in_flight", "Inference requests admitted and not finished", registry=r)
        self.worker_healthy = Gauge(
            "inference_worker_healthy", "1 when the worker takes work", ["worker_id"], registry=r
        )
        self.worker_capacity = Gauge(
            "inference_worker_capacity", "Sequences the worker runs at once", ["worker_id"], registry=r
        )
        self.worker_active = Gauge(
            "inference_worker_active", "Sequences running on the worker", ["worker_id"], registry=r
        )
        self.prompt_tokens = Counter(
            "inference_prompt_tokens_total", "Prompt tokens of finished generations", ["model"], registry=r
        )
        self.cached_tokens = Counter(
            "inference_cached_tokens_total",
            "Prompt tokens served from a worker's prefix cache",
            ["model"],
            registry=r,
        )
        self.worker_cache = {
            field: Gauge(f"inference_worker_prefix_cache_{name}", doc, ["worker_id"], registry=r)
            for field, name, doc in (
                ("prefix_cache_capacity_bytes", "capacity_bytes", "Memory the worker's prefix cache may use"),
                ("prefix_cache_used_bytes", "used_bytes", "Memory the worker's prefix cache uses"),
                ("prefix_cache_queries", "queries", "Prompts the worker looked up in its prefix cache"),
                ("prefix_cache_hits", "hits", "Prompts that reused cached prefix KV"),
                ("prefix_cache_query_tokens", "query_tokens", "Prompt tokens looked up in the prefix cache"),
                ("prefix_cache_hit_tokens", "hit_tokens", "Prompt tokens served from the prefix cache"),
                ("prefix_cache_evictions", "evictions", "Prefix cache blocks evicted"),
            )
        }
        self.routed = Counter(
            "inference_routed_total",
            "Routing decisions: the name asked for, the model chosen, and why (direct, small, large, fallback)",
            ["route", "model", "reason"],
            registry=r,
        )
        self.tenant_requests = Counter(
            "inference_tenant_requests_total", "Inference requests by API key name", ["tenant"], registry=r
        )
        self.tenant_tokens = Counter(
            "inference_tenant_tokens_total",
            "Tokens used by API key name (kind: prompt or completion), as the workers counted them",
            ["tenant", "kind"],
            registry=r,
        )
        self.budget_rejections = Counter(
            "inference_budget_rejections_total", "Requests refused over their key's budget", ["tenant"], registry=r
        )
        self.coalesced = Counter(
            "inference_coalesced_requests_total",
            "Requests that joined an identical generation already in flight",
            ["model"],
            registry=r,
        )
        self._workers: Sequence[WorkerClient] = ()

    def track_workers(self, workers: Sequence[WorkerClient]) -> None:
        """Worker gauges are read from the workers at scrape time."""
        self._workers = workers
        for w in workers:
            self.worker_healthy.labels(w.id).set_function(partial(_healthy, w))
            self.worker_capacity.labels(w.id).set_function(partial(_capacity, w))
            self.worker_active.labels(w.id).set_function(partial(_active, w))
            for field, gauge in self.worker_cache.items():
                gauge.labels(w.id).set_function(partial(_health_field, w, field))

    def route_label(self, route: str, table: Mapping[str, object]) -> str:
        """A route name from the table, or else a model label."""
        return route if route in table else self.model_label(route)

    def model_label(self, model: str) -> str:
        if model in ("", "default-model"):
            return "default-model"
        for w in self._workers:
            if w.models is not None and model in w.models:
                return model
        return "other"


def _healthy(w: WorkerClient) -> float:
    return 1.0 if w.available else 0.0


def _capacity(w: WorkerClient) -> float:
    return float(w.capacity)


def _active(w: WorkerClient) -> float:
    return float(w.active)


def _health_field(w: WorkerClient, field: str) -> float:
    """A figure from the worker's last Health answer (0 before the first)."""
    return float(getattr(w.last_health, field, 0) or 0)
