"""Domain blocklist: exact names and `*.domain` wildcards on label boundaries.

`Blocklist` is an immutable matcher; `BlocklistFile` owns the file it came
from and swaps in a new matcher when the file changes, keeping the old one
when the new contents are broken.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

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
        name = normalize_host(host)
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


class BlocklistFile:
    """The current blocklist of one file, reloaded when asked or when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.current = Blocklist()
        self._stamp: tuple[int, int, int] | None = None

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load_initial(self) -> None:
        """At start a missing file is a warning and an empty list; a broken one is fatal."""
        self._stamp = self._file_stamp()
        if self._stamp is None:
            log.warning("blocklist %s not found; blocking nothing", self.path)
            return
        with open(self.path, encoding="utf-8") as fh:
            self.current = parse_blocklist(fh.read())
        log.info("blocklist loaded: %d entries from %s", len(self.current), self.path)

    def reload(self) -> bool:
        """Read the file again; on any error keep the old list. Whether it changed."""
        self._stamp = self._file_stamp()
        try:
            with open(self.path, encoding="utf-8") as fh:
                new = parse_blocklist(fh.read())
        except (OSError, BlocklistError, UnicodeDecodeError) as exc:
            log.error("blocklist reload failed, keeping %d entries: %s", len(self.current), exc)
            return False
        self.current = new
        log.info("blocklist reloaded: %d entries from %s", len(new), self.path)
        return True

    def changed_on_disk(self) -> bool:
        stamp = self._file_stamp()
        return stamp is not None and stamp != self._stamp
