"""Who may use what: the forward proxy's client list and authentication, the API's keys.

- Forward proxy (plain requests and CONNECT alike): a client outside
  `--allow-clients` gets 403 naming the rule; with `--proxy-auth keys` a
  request needs `Proxy-Authorization: Basic base64(name:token)` of a key in
  the key file (else 407 with `Proxy-Authenticate`), and a key with
  `proxy = false` gets 403.
- API (`/v1/*`): with a key file, `Authorization: Bearer <token>` of a key
  (else 401).

Either way the key's name becomes the request's tenant: the identity for
rate limits, budgets, fair share, metrics and the access log.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from ..config import IPNetwork
from ..errors import Forbidden, ProxyAuthRequired, Unauthorized
from ..http.message import Request
from ..memo import remember
from .keys import ApiKey, KeyFile, KeyTable, basic_credentials, bearer_token

# Client addresses whose verdict is remembered; the table starts over when full.


class AccessPolicy:
    def __init__(self, allow_clients: tuple[IPNetwork, ...] | None, keys: KeyFile | None, *, proxy_auth: bool) -> None:
        self.allow_clients = allow_clients  # None: everyone
        self.keys = keys
        self.proxy_auth = proxy_auth and keys is not None
        # Header value -> key (or None), for the key table it was resolved
        # against: a client sends the same credentials on every request, and
        # this saves decoding and hashing them each time.
        self._resolved: dict[bytes, ApiKey | None] = {}
        self._resolved_for: KeyTable | None = None
        # Client address -> allowed: parsing the address and testing every
        # range costs microseconds on each request of a connection.
        self._verdicts: dict[str, bool] = {}

    def describe_proxy_access(self) -> str:
        """One line for the start-up log: who may use the forward proxy."""
        who = "any client" if self.allow_clients is None else "clients in " + ", ".join(map(str, self.allow_clients))
        return who + (" with a key (Proxy-Authorization: Basic)" if self.proxy_auth else "")

    def client_allowed(self, peer_ip: str) -> bool:
        if self.allow_clients is None:
            return True
        verdict = self._verdicts.get(peer_ip)
        if verdict is None:
            verdict = remember(self._verdicts, peer_ip, self._client_in_ranges(peer_ip, self.allow_clients))
        return verdict

    @staticmethod
    def _client_in_ranges(peer_ip: str, ranges: tuple[IPNetwork, ...]) -> bool:
        try:
            ip = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in ranges)

    def check_proxy(self, req: Request) -> None:
        """Admit a forward-proxy request or raise 403/407; sets `req.tenant` for a key."""
        if not self.client_allowed(req.peer_ip):
            raise Forbidden(f"client {req.peer_ip} may not use this proxy (--allow-clients)")
        if not self.proxy_auth:
            return
        assert self.keys is not None
        value = req.header(b"proxy-authorization")
        if value is None:
            raise ProxyAuthRequired("proxy authentication required (Proxy-Authorization: Basic name:token)")
        key = self._resolve(value, _basic_key)
        if key is None:
            raise ProxyAuthRequired("proxy authentication failed: unknown name or token")
        if not key.proxy:
            raise Forbidden(f"key {key.name!r} may not use the forward proxy (proxy = false)")
        req.tenant = key.name

    def check_api(self, req: Request) -> ApiKey | None:
        """The request's API key (None without a key file), or 401; sets `req.tenant`."""
        if self.keys is None:
            return None
        value = req.header(b"authorization")
        if value is None:
            raise Unauthorized("missing API key: send Authorization: Bearer <key>")
        key = self._resolve(value, _bearer_key)
        if key is None:
            raise Unauthorized("invalid API key")
        req.tenant = key.name
        return key

    def _resolve(self, value: bytes, resolve: Callable[[KeyTable, bytes], ApiKey | None]) -> ApiKey | None:
        assert self.keys is not None
        table = self.keys.current
        if table is not self._resolved_for:  # reloaded: forget what the old table said
            self._resolved.clear()
            self._resolved_for = table
        try:
            return self._resolved[value]
        except KeyError:
            pass
        return remember(self._resolved, value, resolve(table, value), 1024)

    def key_named(self, name: str) -> ApiKey | None:
        """A key by its name (requests relayed from a sibling process carry only the name)."""
        return self.keys.current.by_name.get(name) if self.keys is not None and name else None


def _basic_key(table: KeyTable, value: bytes) -> ApiKey | None:
    creds = basic_credentials(value)
    if creds is None:
        return None
    name, token = creds
    key = table.lookup(token)
    return key if key is not None and key.name == name else None


def _bearer_key(table: KeyTable, value: bytes) -> ApiKey | None:
    token = bearer_token(value)
    return table.lookup(token) if token is not None else None
