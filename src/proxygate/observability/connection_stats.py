"""Open connections and CONNECT tunnels as plain integers, turned into metrics at scrape time.

As with `RequestStats`: an update of a prometheus_client Gauge or Counter
takes a lock and costs about 4,000 instructions (callgrind), and a tunnel's
life made seven of them (the connection opened and closed, the tunnel opened
and closed, how it ended, the bytes each way). Here each is an integer
addition, and the families (`proxy_active_connections`,
`proxy_active_tunnels`, `proxy_tunnels_total`, `proxy_tunnel_bytes_total`)
are built when /metrics is read. The event loop is the only writer.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class ConnectionStats(Collector):
    def __init__(self) -> None:
        self.open_connections = 0  # client connections
        self.open_tunnels = 0
        self.tunnels: dict[str, int] = {"closed": 0}  # by how they ended
        self.bytes_up = 0  # client → origin, through tunnels
        self.bytes_down = 0
        self.gathered = 0  # kept-alive connections passed to process 0 (`--workers N`, `--spread-above`)
        self.shed = 0  # connections process 0 ended while saturated, for its clients to reconnect

    def tunnel_ended(self, result: str) -> None:
        self.tunnels[result] = self.tunnels.get(result, 0) + 1

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("proxy_active_connections", "Open client connections", value=self.open_connections)
        tunnels = CounterMetricFamily("proxy_tunnels", "CONNECT tunnels, by how they ended", labels=["result"])
        for result, n in sorted(self.tunnels.items()):
            tunnels.add_metric([result], n)
        yield tunnels
        yield GaugeMetricFamily("proxy_active_tunnels", "Open CONNECT tunnels", value=self.open_tunnels)
        relayed = CounterMetricFamily("proxy_tunnel_bytes", "Bytes relayed through tunnels", labels=["direction"])
        relayed.add_metric(["up"], self.bytes_up)
        relayed.add_metric(["down"], self.bytes_down)
        yield relayed
        yield CounterMetricFamily(
            "proxy_connections_gathered",
            "Kept-alive client connections passed to process 0 while it served fewer than --spread-above",
            value=self.gathered,
        )
        yield CounterMetricFamily(
            "proxy_connections_shed",
            "Kept-alive connections process 0 ended while saturated (--workers N), for the kernel to spread again",
            value=self.shed,
        )
