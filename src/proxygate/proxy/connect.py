"""CONNECT requests: policy checks, dial, `200 Connection established`, relay."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import BadRequest
from ..http.message import Request
from .dial import Dialer
from .tunnel import Tunnel

if TYPE_CHECKING:
    from ..http.connection import ClientConnection

_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.%\w]+)\]|([^:\[\]/@\s]+)):(\d{1,5})")


def parse_authority(target: bytes) -> tuple[str, int]:
    """`host:port` or `[v6]:port` of a CONNECT request; a port is required."""
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


async def open_tunnel(
    req: Request, host: str, port: int, conn: ClientConnection, dialer: Dialer, idle_timeout: float
) -> Tunnel:
    """Dial host:port, answer 200, and start relaying; the caller awaits `tunnel.done`."""
    tunnel = Tunnel(conn, idle_timeout)
    await dialer.open(host, port, lambda: tunnel)
    conn.response_started = True
    conn.status = 200
    conn.write(
        b"HTTP/1.1 200 Connection established\r\nX-Request-ID: %s\r\n%s\r\n" % (req.request_id.encode(), req.extra_head)
    )
    tunnel.start()
    return tunnel
