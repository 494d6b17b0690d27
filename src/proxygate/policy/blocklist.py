"""Domain blocklist: exact names and `*.domain` wildcards on label boundaries.

`Blocklist` is an immutable matcher; `BlocklistFile` owns the file it came
from and swaps in a new matcher when the file changes, keeping the old one
when the new contents are broken.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..memo import remember
from ..watched_file import WatchedFile

log = logging.getLogger("proxygate.blocklist")


def normalize_host(host: str) -> str:
    """Lower-case, no port, no trailing dot, IPv6 literals without brackets.

    `Example.COM.:443` → `example.com`, `[::1]:8080` → `::1`,
    `[2001:DB8::0001]` → `2001:db8::1` (compressed, so one address has one spelling).
    """
    host = host.strip()
    if host.startswith("["):
        end = host.find("]")
        host = host[1:end] if end != -1 else host[1:]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".").lower()
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0]).compressed
        except ValueError:
            return host
    if host and not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


@dataclass(frozen=True, slots=True)
class Blocklist:
    exact: frozenset[str] = frozenset()
    # For `*.ads.com` we store `ads.com`: it blocks every name with more labels
    # ending in `.ads.com`, never `ads.com` itself nor `badads.com`.
    wildcard_parents: frozenset[str] = frozenset()
    # Verdicts by host as asked (a bounded memo, memo.py): the lists never
    # change, so an answer stays true, and a proxied request costs one
    # lookup instead of normalising its host again.
    _verdicts: dict[str, bool] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> Blocklist:
        exact: set[str] = set()
        parents: set[str] = set()
        for raw in entries:
            entry = raw.strip()
            if not entry:
                continue
            if entry.startswith("*."):
                parents.add(normalize_host(entry[2:]))
            elif entry.startswith("."):
                # Squid's `.domain` means the domain and its subdomains.
                name = normalize_host(entry[1:])
                exact.add(name)
                parents.add(name)
            else:
                exact.add(normalize_host(entry))
        return cls(frozenset(exact), frozenset(parents))

    def __len__(self) -> int:
        return len(self.exact) + len(self.wildcard_parents)

    def is_blocked(self, host: str) -> bool:
        """Whether `host` (any spelling: case, port, trailing dot, brackets) is blocked."""
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = remember(self._verdicts, host, self._decide(normalize_host(host)))
        return verdict

    def _decide(self, name: str) -> bool:
        if name in self.exact:
            return True
        parents = self.wildcard_parents
        if not parents or ":" in name:
            return False
        dot = name.find(".")
        while dot != -1:
            if name[dot + 1 :] in parents:
                return True
            dot = name.find(".", dot + 1)
        return False


class BlocklistError(ValueError):
    pass


def parse_blocklist(text: str) -> Blocklist:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BlocklistError(f"invalid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("blocked_domains", []), list):
        raise BlocklistError('expected {"blocked_domains": ["example.com", "*.tracker.io"]}')
    entries = data.get("blocked_domains", [])
    if not all(isinstance(e, str) for e in entries):
        raise BlocklistError("blocked_domains must hold strings")
    return Blocklist.from_entries(entries)


class BlocklistFile(WatchedFile[Blocklist]):
    """The current blocklist of one file (`current`), reloaded when asked or when it changes."""

    def __init__(self, path: str) -> None:
        super().__init__(
            "blocklist",
            path,
            parse_blocklist,
            Blocklist(),
            lambda b: f"{len(b)} entries",
            BlocklistError,
            missing_ok=True,
        )
