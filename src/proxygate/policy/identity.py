"""Who the client of a request is, for rate limiting.

The peer address, unless the peer is one of our `--trusted-proxies`: then the
right-most address of `X-Forwarded-For` (or `X-Real-IP`) that is not itself a
trusted proxy. Anything a client could forge — a header from an untrusted
peer, a garbage entry — is never believed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..config import IPNetwork
from ..http.message import Headers


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    trusted: tuple[IPNetwork, ...] = ()
    ipv6_prefix: int = 128

    @property
    def is_peer_address(self) -> bool:
        """Whether the key is always just the peer address (no trusted proxies, no IPv6 prefix)."""
        return not self.trusted and self.ipv6_prefix >= 128

    def _is_trusted(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in self.trusted)

    def client_ip(self, peer_ip: str, headers: Headers) -> str:
        if not self.trusted:
            return peer_ip
        try:
            peer = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return peer_ip
        if not self._is_trusted(peer):
            return peer_ip
        forwarded: list[str] = []
        real_ip = None
        for name, value in headers:
            lname = name.lower()
            if lname == b"x-forwarded-for":
                forwarded.extend(part.strip() for part in value.decode("latin-1").split(","))
            elif lname == b"x-real-ip":
                real_ip = value.decode("latin-1").strip()
        if not forwarded and real_ip:
            forwarded = [real_ip]
        client = peer_ip
        for entry in reversed(forwarded):
            try:
                ip = ipaddress.ip_address(_strip_port(entry))
            except ValueError:
                break  # garbage: stop at the last hop we could vouch for
            client = ip.compressed
            if not self._is_trusted(ip):
                break
        return client

    def key(self, peer_ip: str, headers: Headers) -> str:
        """The rate-limit key: the client address, IPv6 optionally by prefix."""
        client = self.client_ip(peer_ip, headers)
        if self.ipv6_prefix < 128 and ":" in client:
            try:
                net = ipaddress.ip_network(f"{client}/{self.ipv6_prefix}", strict=False)
            except ValueError:
                return client
            return net.compressed
        return client


def _strip_port(entry: str) -> str:
    if entry.startswith("["):
        return entry[1 : entry.find("]")] if "]" in entry else entry
    if entry.count(":") == 1:
        return entry.split(":", 1)[0]
    return entry
