"""CONNECT requests: policy checks, dial, `200 Connection established`, relay."""

from __future__ import annotations

import re

from ..errors import BadRequest, DestinationDenied, HttpError
from ..http.exchange import Exchange
from ..http.message import Request
from ..memo import memoized
from ..observability.metrics import GatewayMetrics
from ..policy.blocklist import BlocklistFile
from .dial import Dialer
from .tunnel import Tunnel, UpstreamSide

_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\]/@\s]+)):(\d{1,5})")


@memoized
def parse_authority(target: bytes) -> tuple[str, int]:
    """`host:port` or `[v6]:port` of a CONNECT request; a port is required.

    Remembered (a refusal is not: it raises): the same few destinations come
    again and again, and parsing one costs about 7,000 instructions."""
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("CONNECT target is not ASCII") from None
    match = _AUTHORITY.fullmatch(text)
    if not match:
        raise BadRequest("CONNECT target must be host:port")
    port = int(match.group(3))
    if not 0 < port < 65536:
        raise BadRequest("CONNECT port out of range")
    return (match.group(1) or match.group(2)).lower().rstrip("."), port


class ConnectHandler:
    """Answers CONNECT: blocklist, destination port, dial, 200, relay until the tunnel ends.

    Who may connect and how often is decided before (the gateway's access
    and rate-limit policies); the destination address is checked by the
    dialer when it resolves the host.
    """

    def __init__(self, blocklist: BlocklistFile, dialer: Dialer, metrics: GatewayMetrics, idle_timeout: float) -> None:
        self.blocklist = blocklist
        self.dialer = dialer
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.stats = metrics.connection_stats

    async def handle(self, req: Request, ex: Exchange, host: str, port: int) -> None:
        """Dial host:port, answer 200 and start relaying; returns once the tunnel is up
        (or refused). The exchange ends with the tunnel (`_tunnel_ended`): no task
        waits for that."""
        ex.close_when_done()
        metrics = self.metrics
        if self.blocklist.current.is_blocked(host):
            metrics.blocked.inc()
            ex.send(403, [])
            return
        tunnel = Tunnel(ex, self.idle_timeout, self._tunnel_ended)
        try:
            self.dialer.policy.check_connect_port(port)
            # A new side per dial attempt, held by its transport only (the tunnel holding it
            # too would be a cycle, left to the garbage collector).
            await self.dialer.open(host, port, lambda: UpstreamSide(tunnel), ex.conn.loop)
        except DestinationDenied:
            metrics.denied.labels("connect").inc()
            self.stats.tunnel_ended("denied")
            raise
        except HttpError:
            self.stats.tunnel_ended("dial_failed")
            raise
        self.stats.open_tunnels += 1
        ex.start_raw(
            200,
            b"HTTP/1.1 200 Connection established\r\nX-Request-ID: %s\r\n%s\r\n"
            % (req.request_id.encode(), req.extra_head),
        )
        ex.outlive_handler()
        tunnel.start()

    def _tunnel_ended(self, tunnel: Tunnel, why: str) -> None:
        stats = self.stats
        stats.open_tunnels -= 1
        stats.bytes_up += tunnel.bytes_up
        stats.bytes_down += tunnel.bytes_down
        stats.tunnel_ended("idle_timeout" if why == "idle timeout" else "closed")
        ex = tunnel.exchange
        ex.relayed(tunnel.bytes_up, tunnel.bytes_down)
        ex.finish()
