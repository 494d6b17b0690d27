"""SSRF: every spelling of a loopback, unspecified, private or link-local address is refused.

The gateway runs with its default destination policy (only the port
policies opened, so the destination rule alone decides). A canary listens
on every local address (IPv6 `::`, dual-stack) on one port; each spelling
names that port, as plain HTTP and as CONNECT. A spelling passes when the
gateway answers 4xx and the canary is never reached.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from proxygate.config import DENY_DEFAULT

from .harness import GatewayProcess, Report, accept_forever, exchange, status_of

# Refused out of the box (--deny-destinations' default: loopback, unspecified, link-local).
DENIED_BY_DEFAULT = [
    "127.0.0.1",
    "127.1",
    "127.0.1",
    "2130706433",
    "0x7f000001",
    "0x7f.0.0.1",
    "0177.0.0.1",
    "017700000001",
    "127.0.0.1.",
    "127.255.255.254",
    "localhost",
    "localhost.",
    "LOCALHOST",
    "0.0.0.0",
    "0",
    "0.0.0",
    "[::1]",
    "[::]",
    "[::0]",
    "[0:0:0:0:0:0:0:0]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:127.0.0.1]",
    "[::127.0.0.1]",
    "[64:ff9b::7f00:1]",
    "[2002:7f00:1::]",
    "[::ffff:0.0.0.0]",
    "[fe80::1]",
    "169.254.169.254",
    "[::ffff:169.254.169.254]",
    "[::ffff:a9fe:a9fe]",
]
# Private ranges stay reachable by default (a proxy inside a company must reach its hosts);
# an operator who lists them in --deny-destinations gets them refused in every spelling.
PRIVATE = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7"
PRIVATE_SPELLINGS = [
    "10.0.0.1",
    "012.0.0.1",
    "167772161",
    "172.16.0.1",
    "192.168.0.1",
    "0xc0.0xa8.0.1",
    "100.64.0.1",
    "[fc00::1]",
    "[fd00::1]",
    "[::ffff:10.0.0.1]",
    "[::ffff:a00:1]",
    "[64:ff9b::a00:1]",
    "[2002:a00:1::]",
]


class Canary:
    """Counts connections on one port of every local address."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET6)
        self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind(("::", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self._lock = threading.Lock()
        accept_forever(self.sock, self._hit)

    def _hit(self, conn: socket.socket) -> None:
        with self._lock:
            self.hits += 1
        conn.close()

    def close(self) -> None:
        self.sock.close()


def run_ssrf(work: Path, report: Report) -> None:
    canary = Canary()
    try:
        open_ports = ["--http-ports", "*", "--connect-ports", "*"]
        for name, flags, hosts in (
            ("SSRF spellings, default policy", open_ports, DENIED_BY_DEFAULT),
            (
                "SSRF spellings, private ranges denied",
                [*open_ports, "--deny-destinations", f"{DENY_DEFAULT},{PRIVATE}"],
                PRIVATE_SPELLINGS,
            ),
        ):
            gw = GatewayProcess(flags, work / "ssrf-gateway.log")
            try:
                _table(gw, canary, name, hosts, report)
            finally:
                gw.stop()
    finally:
        canary.close()


def _table(gw: GatewayProcess, canary: Canary, name: str, hosts: list[str], report: Report) -> None:
    refused = 0
    failures = []
    hits_before = canary.hits
    for host in hosts:
        authority = f"{host}:{canary.port}".encode()
        for kind, data in (
            ("http", b"GET http://%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)),
            ("userinfo", b"GET http://evil.test@%s/ HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)),
            ("connect", b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (authority, authority)),
        ):
            before = canary.hits
            code = status_of(exchange(gw.port, data, timeout=5.0))
            if 400 <= code < 500 and canary.hits == before:
                refused += 1
            else:
                failures.append(f"{kind} {host}: {code or 'no answer'}, canary hit {canary.hits - before}")
    total = len(hosts) * 3
    report.add(
        name,
        refused == total and canary.hits == hits_before,
        f"{refused}/{total} refused ({len(hosts)} host spellings × plain, userinfo and CONNECT); "
        f"canary connections: {canary.hits - hits_before}",
    )
    if failures:
        report.detail(f"{name}: not refused", failures)
