"""Merging the metrics of several serving processes (pure logic, no processes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from proxygate.observability.connection_stats import ConnectionStats
from proxygate.observability.metrics_exchange import MetricsExchange, merge, snapshot


def process_registry(requests: int, open_conns: int, worker_active: int) -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("reqs", "requests", ["code"], registry=r).labels("200").inc(requests)
    Gauge("open_conns", "open connections", registry=r).set(open_conns)
    Gauge("inference_worker_active", "observed", ["worker_id"], registry=r).labels("w1").set(worker_active)
    h = Histogram("latency", "latency", buckets=(0.1, 1.0), registry=r)
    for _ in range(requests):
        h.observe(0.5)
    return r


def values(families: list) -> dict[tuple[str, tuple], float]:
    return {(s[0], tuple(sorted(s[1].items()))): s[2] for fam in families for s in fam["samples"]}


def test_counters_histograms_and_local_gauges_add_observed_gauges_do_not() -> None:
    a, b = process_registry(3, 5, 2), process_registry(4, 1, 2)
    merged = values(merge([snapshot(a), snapshot(b)], ("inference_worker_",)))
    assert merged[("reqs_total", (("code", "200"),))] == 7
    assert merged[("open_conns", ())] == 6
    assert merged[("inference_worker_active", (("worker_id", "w1"),))] == 2
    assert merged[("latency_bucket", (("le", "1.0"),))] == 7
    assert merged[("latency_count", ())] == 7 and merged[("latency_sum", ())] == 3.5
    created = [v for (name, _), v in merged.items() if name == "reqs_created"]
    assert created == [
        min(
            values(snapshot(a))[("reqs_created", (("code", "200"),))],
            values(snapshot(b))[("reqs_created", (("code", "200"),))],
        )
    ]


def test_exchange_renders_live_metrics_plus_published_peers(tmp_path) -> None:
    mine, peer = process_registry(2, 1, 0), process_registry(5, 0, 0)
    MetricsExchange(tmp_path, 1).publish(peer)
    ours = MetricsExchange(tmp_path, 0)
    ours.publish(mine)  # our own file is never read back: the live registry is used
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ours.merged(mine))
    text = generate_latest(registry).decode()
    assert 'reqs_total{code="200"} 7.0' in text
    assert "latency_count 7.0" in text


def test_connection_stats_export_the_contract_names_and_add_across_processes() -> None:
    def process(open_conns: int, tunnels: dict[str, int], up: int) -> CollectorRegistry:
        r = CollectorRegistry()
        stats = ConnectionStats()
        r.register(stats)
        stats.open_connections = open_conns
        stats.open_tunnels = open_conns // 2
        for result, n in tunnels.items():
            for _ in range(n):
                stats.tunnel_ended(result)
        stats.bytes_up, stats.bytes_down = up, 2 * up
        return r

    a = process(4, {"closed": 3, "denied": 1}, 100)
    text = generate_latest(a).decode()
    for line in (
        "proxy_active_connections 4.0",
        "proxy_active_tunnels 2.0",
        'proxy_tunnels_total{result="closed"} 3.0',
        'proxy_tunnels_total{result="denied"} 1.0',
        'proxy_tunnel_bytes_total{direction="up"} 100.0',
        'proxy_tunnel_bytes_total{direction="down"} 200.0',
    ):
        assert line in text.splitlines(), line
    # Before any tunnel ends, "closed" is already there at zero (as a labelled child bound at start was).
    assert 'proxy_tunnels_total{result="closed"} 0.0' in generate_latest(process(0, {}, 0)).decode()
    merged = values(merge([snapshot(a), snapshot(process(2, {"idle_timeout": 2}, 5))]))
    assert merged[("proxy_active_connections", ())] == 6
    assert merged[("proxy_active_tunnels", ())] == 3
    assert merged[("proxy_tunnels_total", (("result", "closed"),))] == 3
    assert merged[("proxy_tunnels_total", (("result", "idle_timeout"),))] == 2
    assert merged[("proxy_tunnel_bytes_total", (("direction", "down"),))] == 210
