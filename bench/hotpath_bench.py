"""CPU per proxied request in one process, with no sockets: the gateway's own cost, nothing else.

A real gateway (`build_gateway` with the default settings: JSON access log,
memory rate limiter on every request) serves a fake client transport, and
its upstream pool dials a fake origin that answers each request from the
same loop. So the time measured is the gateway's Python and httptools work
per request (parse, policies, forward, parse the response, write it, log
and count it), without the kernel, the client or the origin that share the
CPU in `proxy_bench.py`. Keep-alive on both sides, as wrk's c=N runs.

    .venv/bin/python bench/hotpath_bench.py [--requests 20000] [--runs 5] [--clients 1]

Prints the median CPU microseconds per request over the runs (and each
run). With `--clients N`, N connections each keep one request in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from proxygate.config import GatewaySettings  # noqa: E402
from proxygate.http.connection import ClientConnection  # noqa: E402
from proxygate.observability.logging import AccessLog  # noqa: E402
from proxygate.wiring import build_gateway  # noqa: E402

REQUEST = b"GET http://origin.test/small HTTP/1.1\r\nHost: origin.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 00:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 39\r\nConnection: keep-alive\r\n\r\n"
    b"0123456789012345678901234567890123456\r\n"
)


class Transport:
    """Enough of an asyncio transport for both ends; `sink` sees every write."""

    def __init__(self, sink: Callable[[bytes], None], peer: tuple[str, int]) -> None:
        self.sink = sink
        self.protocol: Any = None
        self.peer = peer
        self.closing = False

    def write(self, data: bytes) -> None:
        self.sink(data)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.sink(chunk)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer}.get(name, default)


class FakeOrigin:
    """The pool's dialer: each connection answers every request head with RESPONSE on the next pass."""

    async def open(self, host: str, port: int, factory: Callable[[], Any]) -> tuple[Any, Any]:
        loop = asyncio.get_running_loop()
        protocol = factory()

        def received(data: bytes) -> None:
            for _ in range(data.count(b"\r\n\r\n")):
                loop.call_soon(protocol.data_received, RESPONSE)

        transport = Transport(received, ("127.0.0.2", 80))
        protocol.connection_made(transport)
        return transport, protocol


async def run_once(requests: int, clients: int) -> float:
    settings = GatewaySettings()
    devnull = open(os.devnull, "w")  # noqa: SIM115 - closed below
    gateway = build_gateway(settings, access_log=AccessLog("json", stream=devnull))
    gateway.pool.dialer = FakeOrigin()  # type: ignore[assignment]
    gateway.bound(3128)
    loop = asyncio.get_running_loop()
    per_client = requests // clients
    done = loop.create_future()
    left = [clients]

    def client(i: int) -> None:
        remaining = [per_client]
        conn = ClientConnection(gateway)

        def received(data: bytes) -> None:
            # One write per response here (head and body together): the next request goes now.
            remaining[0] -= 1
            if remaining[0] > 0:
                loop.call_soon(conn.data_received, REQUEST)
            else:
                left[0] -= 1
                if not left[0]:
                    done.set_result(None)

        transport = Transport(received, ("127.0.0.1", 40000 + i))
        transport.protocol = conn
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.data_received(REQUEST)

    gc.collect()
    started = time.process_time()
    for i in range(clients):
        client(i)
    await done
    elapsed = time.process_time() - started
    gateway.access_log.flush()
    devnull.close()
    return elapsed / (per_client * clients) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    import uvloop

    runs = [uvloop.run(run_once(args.requests, args.clients)) for _ in range(args.runs)]
    print(
        f"CPU per proxied request: median {statistics.median(runs):.1f} us "
        f"(runs: {', '.join(f'{r:.1f}' for r in runs)}; {args.requests} requests, {args.clients} client(s))"
    )


if __name__ == "__main__":
    main()
