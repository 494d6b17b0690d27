#!/usr/bin/env python3
"""The floor of a CONNECT tunnel in Python: the least a uvloop proxy can do, measured
beside proxygate and squid under the bar's load (hey through CONNECT to a TLS origin,
a new connection per request).

`--serve PORT` runs the floor proxy itself: it reads the CONNECT head, dials, answers
200 and relays, nothing more (no parser, policies, limits, timeouts, log or metrics).
Without it, the comparison: N rounds of `hey -disable-keepalive -c 16` through each
target in turn, with each one's CPU (its whole process tree) per request.

Run:  .venv/bin/python bench/connect_floor.py [--rounds 4] [--duration 3]

It says how much of a tunnel's cost is the interpreter and the loop (the floor) and
how much is the gateway's own work (proxygate minus the floor).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import proxy_bench as pb  # noqa: E402


class _Upstream(asyncio.Protocol):
    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)

    def eof_received(self) -> bool:
        self.client.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


Dial = Callable[[Callable[[], asyncio.Protocol], str, int], Awaitable[tuple[Any, Any]]]


class _Client(asyncio.Protocol):
    """`dial`: how to connect upstream (the loop's create_connection; hotpath_bench.py's
    instruction counts pass its fake origin)."""

    def __init__(self, dial: Dial | None = None) -> None:
        self.dial = dial

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.head = b""
        self.upstream: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.head += data
        if b"\r\n\r\n" not in self.head:
            return
        head, _, rest = self.head.partition(b"\r\n\r\n")
        host, _, port = head.split(b" ", 2)[1].decode().rpartition(":")
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self._dial(host, int(port), rest))

    async def _dial(self, host: str, port: int, rest: bytes) -> None:
        try:
            dial = self.dial or asyncio.get_running_loop().create_connection
            upstream, _ = await dial(lambda: _Upstream(self.transport), host, port)
        except OSError:
            self.transport.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
            return
        self.upstream = upstream
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.write(rest)
        self.transport.resume_reading()

    def eof_received(self) -> bool:
        if self.upstream is not None:
            self.upstream.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def _serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(_Client, "127.0.0.1", port, backlog=2048)
    await asyncio.Event().wait()


def compare(rounds: int, duration: float) -> str:
    work = Path(tempfile.mkdtemp())
    os.chmod(work, 0o755)
    proxies = pb.make_proxies(work, {"proxygate", "proxygate-1p", "squid"})
    port = pb.free_port()
    proxies.append(pb.Proxy("floor", [sys.executable, __file__, "--serve", str(port)], port))
    tls, tls_port = pb.start_tls_origin(work)
    url = f"https://127.0.0.1:{tls_port}/small"
    results: dict[str, list[tuple[float, float]]] = {p.name: [] for p in proxies}
    try:
        for p in proxies:
            p.start(work)
        for r in range(rounds):
            for p in proxies if r % 2 == 0 else proxies[::-1]:
                assert p.proc is not None
                cpu0, t0 = pb.cpu_seconds(p.proc.pid), time.monotonic()
                out = pb._run_hey(url, p.port, duration, 16, "-disable-keepalive")
                elapsed, cpu = time.monotonic() - t0, pb.cpu_seconds(p.proc.pid) - cpu0
                rate = pb._hey_rate(out)
                if not re.search(r"\[200\]", out):
                    raise SystemExit(f"{p.name}: no 200 answers\n{out[-2000:]}")
                results[p.name].append((rate, cpu / (rate * elapsed) * 1e6))
    finally:
        for p in proxies:
            p.stop()
        tls.terminate()
    lines = [
        f"hey -disable-keepalive -c 16 through CONNECT to a TLS origin, {rounds} rounds of {duration:g} s (medians)",
        "",
        "| target | req/s | rounds | CPU µs per request |",
        "|---|---|---|---|",
    ]
    for name, runs in results.items():
        rates = [r for r, _ in runs]
        lines.append(
            f"| {name} | {statistics.median(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} | "
            f"{statistics.median(c for _, c in runs):.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, default=0, help="run the floor proxy on this port")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=3.0)
    args = parser.parse_args()
    if args.serve:
        import uvloop

        uvloop.run(_serve(args.serve))
        return
    print(compare(args.rounds, args.duration))


if __name__ == "__main__":
    main()
