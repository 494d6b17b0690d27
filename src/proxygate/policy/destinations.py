"""Where a proxied request may go: CONNECT ports, denied address ranges, loops.

Pure decisions on already-resolved addresses; the dialer asks these before it
opens a socket, so a refusal never costs a connection attempt.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any

from ..config import GatewaySettings, IPNetwork
from ..errors import DestinationDenied
from ..memo import remember

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SockAddr = tuple[Any, ...]  # (host, port) or (host, port, flowinfo, scope_id)


def _is_local_address(ip: IPAddress) -> bool:
    """Whether this machine owns `ip` (binding to it succeeds only if so)."""
    if ip.is_loopback or ip.is_unspecified:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries and a network stack may reach:
    IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d), 6to4
    (2002:aabb:ccdd::) and NAT64 (64:ff9b::a.b.c.d)."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    packed = ip.packed
    if packed[:12] == bytes(12) and int(ip) > 1:  # ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(packed[12:])
    if ip in _NAT64:
        return ipaddress.IPv4Address(packed[12:])
    return None


@dataclass(frozen=True, slots=True)
class DestinationPolicy:
    connect_ports: frozenset[int] | None
    deny: tuple[IPNetwork, ...]
    listen_host: str
    listen_port: int
    http_ports: frozenset[int] | None = None
    # The denying range by address (a bounded memo, memo.py): `deny` never
    # changes, so an answer stays true (scanning the default list costs
    # about 15,000 instructions per dial).
    _denials: dict[IPAddress, IPNetwork | None] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_settings(cls, settings: GatewaySettings, bound_port: int | None = None) -> DestinationPolicy:
        host, port = settings.listen
        return cls(settings.connect_ports, settings.deny_destinations, host, bound_port or port, settings.http_ports)

    def check_http_port(self, port: int) -> None:
        if self.http_ports is not None and port not in self.http_ports:
            raise DestinationDenied(f"plain HTTP to port {port} is not allowed (--http-ports)")

    def check_connect_port(self, port: int) -> None:
        if self.connect_ports is not None and port not in self.connect_ports:
            allowed = ",".join(str(p) for p in sorted(self.connect_ports)[:10]) or "none"
            raise DestinationDenied(f"CONNECT to port {port} is not allowed (--connect-ports {allowed})")

    def denied_by(self, ip: IPAddress) -> IPNetwork | None:
        """The denied range `ip` falls in, by itself or by the IPv4 address it embeds."""
        try:
            return self._denials[ip]
        except KeyError:
            return remember(self._denials, ip, self._first_denying(ip))

    def _first_denying(self, ip: IPAddress) -> IPNetwork | None:
        embedded = embedded_ipv4(ip)
        for net in self.deny:
            if ip in net or (embedded is not None and embedded in net):
                return net
        return None

    def is_own_listener(self, ip: IPAddress, port: int) -> bool:
        if port != self.listen_port:
            return False
        if self.listen_host in ("", "0.0.0.0", "::"):
            return _is_local_address(ip)
        try:
            return ip == ipaddress.ip_address(self.listen_host) or (ip.is_unspecified)
        except ValueError:
            return _is_local_address(ip)

    def names_own_listener(self, host: str, port: int) -> bool:
        """Whether an absolute-form URL's authority names this gateway (served locally)."""
        if port != self.listen_port:
            return False
        if host in ("localhost", self.listen_host):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return self.is_own_listener(ip, port)

    def allowed_addresses(
        self, host: str, port: int, addresses: list[tuple[IPAddress, SockAddr]]
    ) -> list[tuple[IPAddress, SockAddr]]:
        """The resolved addresses we may dial; raises when none is left."""
        allowed = []
        first_denial: str | None = None
        for ip, sockaddr in addresses:
            if self.is_own_listener(ip, port):
                first_denial = first_denial or f"{host}:{port} is this gateway's own listener (loop refused)"
                continue
            net = self.denied_by(ip)
            if net is not None:
                first_denial = (
                    first_denial or f"destination {host} resolves to {ip}, denied by --deny-destinations {net}"
                )
                continue
            allowed.append((ip, sockaddr))
        if not allowed:
            raise DestinationDenied(first_denial or f"no address for {host}")
        return allowed
