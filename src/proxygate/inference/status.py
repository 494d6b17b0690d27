"""The inference plane as the status page shows it: workers and the queue, as plain data."""

from __future__ import annotations

from typing import Any

from .service import DEFAULT_MODEL, InferenceService, priority_label
from .workers import WorkerClient

PRIORITIES = ("high", "medium", "low")


def plane_status(service: InferenceService) -> dict[str, Any]:
    depths: dict[str, dict[str, int]] = {}
    for (model, priority), n in sorted(service.queue.depths().items()):
        by_priority = depths.setdefault(model or DEFAULT_MODEL, dict.fromkeys(PRIORITIES, 0))
        by_priority[priority_label(priority)] += n
    return {
        "workers": [worker_status(w) for w in service.pool.workers],
        "queue": {"depth": len(service.queue), "by_model": depths},
        "in_flight": service.in_flight,
        "routes": service.routes.current.names(),
    }


def worker_status(w: WorkerClient) -> dict[str, Any]:
    h = w.last_health
    if w.available:
        state = "ready"
    elif w.healthy:
        state = "loading"
    elif h is None and w.failures < w.eject_after:
        state = "connecting"
    else:
        state = "down"
    return {
        "address": w.addr,
        "state": state,
        "healthy": w.available,
        "engine": w.engine,
        "models": sorted(w.models) if w.models is not None else [],
        "active": w.active,
        "capacity": w.capacity,
        "cache": {
            "capacity_bytes": h.prefix_cache_capacity_bytes if h else 0,
            "used_bytes": h.prefix_cache_used_bytes if h else 0,
            "queries": h.prefix_cache_queries if h else 0,
            "hits": h.prefix_cache_hits if h else 0,
            "query_tokens": h.prefix_cache_query_tokens if h else 0,
            "hit_tokens": h.prefix_cache_hit_tokens if h else 0,
        },
    }
