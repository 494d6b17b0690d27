"""CPU per proxied request in one process, with no sockets: the gateway's own cost, nothing else.

A real gateway (`build_gateway` with the default settings: JSON access log,
memory rate limiter on every request) serves a fake client transport, and
its upstream pool dials a fake origin that answers each request from the
same loop. So the time measured is the gateway's Python and httptools work
per request (parse, policies, forward, parse the response, write it, log
and count it), without the kernel, the client or the origin that share the
CPU in `proxy_bench.py`. Keep-alive on both sides, as wrk's c=N runs.

    .venv/bin/python bench/hotpath_bench.py [--requests 20000] [--runs 5] [--clients 1]
        [--connect | --new-connections] [--processes N] [--instructions]

Prints the median CPU microseconds per request over the runs (and each
run). With `--clients N`, N connections each keep one request in flight.
With `--connect`, each request is a new client connection that opens a
CONNECT tunnel, gets its 200 and closes (the tunnel's upstream closes in
turn): the Python cost of a tunnel's life, without the socket calls;
`--relay N` adds N exchanges through each tunnel (a small message up, a
response down: about what a TLS handshake and one request make).
With `--new-connections`, each request comes on a new client connection
(`Connection: close`, as `hey -disable-keepalive` sends it), the upstream
connection pooled. With `--processes N` (N > 1), the rate limiter's store is
the shared-memory one a gateway served by N processes uses (the default on a
machine with several CPUs); otherwise the in-process one. With
`--instructions`, each measure is instead the instructions executed per
request, counted by valgrind's callgrind (runs of
N and 2N requests, so what does not grow with the requests cancels out):
the same count whatever else the machine is doing, so a before/after of a
few percent holds on a noisy machine (use `--requests 1000`; valgrind is
about 50 times slower).
With `--inference TOKENS`, each request is a new client connection that
POSTs a greedy `/v1/inference` request for TOKENS tokens to a real
zero-latency echo worker (a subprocess, over gRPC) and reads the SSE stream
to its end: the gateway's CPU per inference request, its gRPC client
included (the worker's CPU is not counted). `--api openai` streams a chat
completion instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import itertools
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from proxygate.config import GatewaySettings  # noqa: E402
from proxygate.gateway import Gateway  # noqa: E402
from proxygate.http.connection import ClientConnection  # noqa: E402
from proxygate.observability.logging import AccessLog  # noqa: E402
from proxygate.policy.ratelimit import build_limiter  # noqa: E402
from proxygate.proxy import dial  # noqa: E402
from proxygate.server import _quiet_gc as quiet_gc  # noqa: E402
from proxygate.wiring import build_gateway  # noqa: E402

REQUEST = b"GET http://origin.test/small HTTP/1.1\r\nHost: origin.test\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 06 Dec 2026 00:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 39\r\nConnection: keep-alive\r\n\r\n"
    b"0123456789012345678901234567890123456\r\n"
)


def bench_settings(processes: int = 1) -> GatewaySettings:
    """The defaults, with the memory rate limiter checking every request against a budget the
    load never exhausts; `processes` > 1: its store is the shared-memory one of a gateway
    served by that many processes (the default on a machine with several CPUs)."""
    return dataclasses.replace(GatewaySettings(), rate_limit=10**9, rate_burst=10**9, workers=processes)


def _dropped(data: bytes) -> None:
    pass


class Transport:
    """Enough of an asyncio transport for both ends; `sink` sees every write, and closing
    tells the protocol on it (which changes when a tunnel starts)."""

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
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self._lost)

    def _lost(self) -> None:
        # As uvloop's transports do, forget the protocol once it is told: what is left of
        # a connection is then garbage by reference counts alone, unless the protocol
        # itself made a cycle.
        protocol, self.protocol, self.sink = self.protocol, None, _dropped
        protocol.connection_lost(None)

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
    """The dialer: each connection answers every request head with RESPONSE on the next pass;
    a half-close is answered with EOF and the connection's end, as an origin closing does."""

    async def open(
        self, host: str, port: int, factory: Callable[[], Any], loop: asyncio.AbstractEventLoop | None = None
    ) -> tuple[Any, Any]:
        loop = loop or asyncio.get_running_loop()
        protocol = factory()

        def received(data: bytes) -> None:
            for _ in range(data.count(b"\r\n\r\n")):
                loop.call_soon(protocol.data_received, RESPONSE)

        transport = OriginTransport(received, ("127.0.0.2", 80))
        transport.protocol = protocol
        protocol.connection_made(transport)
        return transport, protocol


class OriginTransport(Transport):
    def write_eof(self) -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(self._origin_closes)

    def _origin_closes(self) -> None:
        # Answered with its own EOF, and then closed, as nginx closes a connection
        # whose client half-closed (whatever the protocol asks).
        self.protocol.eof_received()
        self.close()


@contextlib.contextmanager
def bench_gateway(settings: GatewaySettings) -> Iterator[Gateway]:
    """A gateway on `settings` as `serve` builds it, its listener taken as bound and the
    garbage collector set as `serve` sets it (what exists now frozen, collections rarer);
    the access log is formatted as in production and written to /dev/null."""
    with open(os.devnull, "w") as devnull:
        limiter = build_limiter(settings, processes=settings.workers)
        gateway = build_gateway(settings, access_log=AccessLog("json", stream=devnull), limiter=limiter)
        gateway.bound(3128)
        quiet_gc()
        yield gateway
        gateway.access_log.flush()


def open_client(
    gateway: Gateway, received: Callable[[bytes], None], port: int = 40000
) -> tuple[ClientConnection, Transport]:
    """A client connection to `gateway` over a fake transport whose writes go to `received`."""
    conn = ClientConnection(gateway)
    transport = Transport(received, ("127.0.0.1", port))
    transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


async def serially(gateway: Gateway, requests: int, open_one: Callable[[], None]) -> float:
    """CPU microseconds per connection: `open_one` makes a client connection, and the
    next is made when the gateway has closed it, `requests` in all."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [requests]
    gateway_closed = gateway.connection_closed

    def closed(conn: ClientConnection) -> None:
        gateway_closed(conn)
        left[0] -= 1
        if left[0] > 0:
            loop.call_soon(open_one)
        else:
            done.set_result(None)

    gateway.connection_closed = closed  # type: ignore[method-assign]
    gc.collect()
    started = time.process_time()
    open_one()
    await done
    return (time.process_time() - started) / requests * 1e6


async def connect_once(requests: int, relay: int = 0, processes: int = 1) -> float:
    """CPU per CONNECT tunnel: new client connection, CONNECT, 200, `relay` exchanges through
    the tunnel (a message up, one down: a TLS handshake is about two), client EOF, origin EOF,
    both closed."""
    # The real dialer (address parsing, destination policy, dial timeout) with the socket part faked.
    origin = FakeOrigin()

    async def fake_connect(loop: Any, factory: Callable[[], Any], ip: Any, sockaddr: Any) -> tuple[Any, Any]:
        return await origin.open(sockaddr[0], sockaddr[1], factory)  # as dial._connect does

    dial._connect = fake_connect  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    connect = b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: 127.0.0.2:443\r\n\r\n"
    with bench_gateway(dataclasses.replace(bench_settings(processes), deny_destinations=())) as gateway:

        def tunnel() -> None:
            left = [relay]

            def received(data: bytes) -> None:
                # The 200, then each answer through the tunnel: the next message, or, when
                # the client is done, its half-close (as the bench's client closes).
                if left[0] == relay and not data.startswith(b"HTTP/1.1 200 "):
                    raise SystemExit(f"the tunnel was refused: {data[:80]!r}")
                # The protocol is looked up when the bytes arrive, as a socket's reader does:
                # the 200 is written before the tunnel takes the socket.
                if left[0] == 0:
                    loop.call_soon(lambda: transport.protocol.eof_received())
                    return
                left[0] -= 1
                loop.call_soon(lambda: transport.protocol.data_received(REQUEST))  # the origin answers RESPONSE

            conn, transport = open_client(gateway, received)
            conn.data_received(connect)

        return await serially(gateway, requests, tunnel)


async def floor_once(requests: int, relay: int = 0) -> float:
    """`connect_once` through the floor (bench/connect_floor.py: read the head, dial,
    200, relay; nothing else) instead of the gateway: what a tunnel costs in Python
    and the loop alone, with the same fake client, origin and transports."""
    import connect_floor

    origin = FakeOrigin()
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    left = [requests]

    def dial(factory: Callable[[], Any], host: str, port: int) -> Any:
        return origin.open(host, port, factory, loop)

    def tunnel() -> None:
        exchanges = [relay]

        def received(data: bytes) -> None:
            if exchanges[0] == relay and not data.startswith(b"HTTP/1.1 200 "):
                raise SystemExit(f"the tunnel was refused: {data[:80]!r}")
            if exchanges[0] == 0:
                loop.call_soon(lambda: transport.protocol.eof_received())
                return
            exchanges[0] -= 1
            loop.call_soon(lambda: transport.protocol.data_received(REQUEST))

        client = connect_floor._Client(dial)
        lost = client.connection_lost

        def closed(exc: Exception | None) -> None:
            lost(exc)
            left[0] -= 1
            if left[0] > 0:
                loop.call_soon(tunnel)
            else:
                done.set_result(None)

        client.connection_lost = closed  # type: ignore[method-assign]
        transport = Transport(received, ("127.0.0.1", 40000))
        transport.protocol = client
        client.connection_made(transport)  # type: ignore[arg-type]
        client.data_received(b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: 127.0.0.2:443\r\n\r\n")

    gc.collect()
    started = time.process_time()
    tunnel()
    await done
    return (time.process_time() - started) / requests * 1e6


async def new_connection_once(requests: int, processes: int = 1) -> float:
    """CPU per proxied request on a new client connection (`Connection: close`, as
    `hey -disable-keepalive` sends), the upstream connection pooled."""
    request = REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")

    def received(data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"not a 200: {data[:80]!r}")

    with bench_gateway(bench_settings(processes)) as gateway:
        gateway.pool.dialer = FakeOrigin()  # type: ignore[assignment]

        def one() -> None:
            conn, _ = open_client(gateway, received)
            conn.data_received(request)

        return await serially(gateway, requests, one)


async def run_once(requests: int, clients: int, processes: int = 1) -> float:
    with bench_gateway(bench_settings(processes)) as gateway:
        gateway.pool.dialer = FakeOrigin()  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        per_client = requests // clients
        done = loop.create_future()
        left = [clients]

        def client(i: int) -> None:
            remaining = [per_client]

            def received(data: bytes) -> None:
                # One write per response here (head and body together): the next request goes now.
                if not data.startswith(b"HTTP/1.1 200 "):
                    raise SystemExit(f"not a 200: {data[:80]!r}")
                remaining[0] -= 1
                if remaining[0] > 0:
                    loop.call_soon(conn.data_received, REQUEST)
                else:
                    left[0] -= 1
                    if not left[0]:
                        done.set_result(None)

            conn, _ = open_client(gateway, received, 40000 + i)
            conn.data_received(REQUEST)

        gc.collect()
        started = time.process_time()
        for i in range(clients):
            client(i)
        await done
        elapsed = time.process_time() - started
        return elapsed / (per_client * clients) * 1e6


def inference_request(api: str, tokens: int, n: int) -> bytes:
    """A request with a prompt of its own (no coalescing between requests), asking for `tokens` tokens."""
    prompt = " ".join(f"w{i}" for i in range(20)) + f" #{n}"
    if api == "openai":
        path = b"/v1/chat/completions"
        body = (
            b'{"model":"default-model","stream":true,"max_tokens":%d,"temperature":0,'
            b'"messages":[{"role":"user","content":"%s"}]}' % (tokens, prompt.encode())
        )
    else:
        path = b"/v1/inference"
        body = b'{"prompt":"%s","max_tokens":%d,"temperature":0}' % (prompt.encode(), tokens)
    return (
        b"POST %s HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Connection: close\r\n\r\n%s" % (path, len(body), body)
    )


async def inference_once(requests: int, worker: str, api: str, tokens: int, coalesce: bool) -> float:
    """CPU per inference request over a new connection, one at a time, until each stream's end."""
    settings = dataclasses.replace(bench_settings(), worker_addrs=(worker,), coalesce=coalesce)
    with bench_gateway(settings) as gateway:
        service = gateway.inference
        assert service is not None
        while not any(w.available for w in service.pool.workers):  # the first health poll
            await asyncio.sleep(0.05)
        numbers = itertools.count()

        def received(data: bytes) -> None:
            if data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 200 "):
                raise SystemExit(f"not a 200: {data[:200]!r}")

        def one() -> None:
            conn, _ = open_client(gateway, received)
            conn.data_received(inference_request(api, tokens, next(numbers)))

        cpu = await serially(gateway, requests, one)
        await service.aclose()
        return cpu


def echo_worker() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "proxygate", "worker", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen([*argv, "--max-concurrency", "8"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the echo worker did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--connect", action="store_true", help="CONNECT tunnels, a new connection each")
    parser.add_argument("--relay", type=int, default=0, help="with --connect: exchanges through each tunnel")
    parser.add_argument(
        "--floor", action="store_true", help="with --connect: through bench/connect_floor.py's proxy, not the gateway"
    )
    parser.add_argument("--new-connections", action="store_true", help="a new client connection per request")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="the stores of a gateway served by this many processes (the shared-memory rate limiter)",
    )
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per request with callgrind instead of CPU time"
    )
    parser.add_argument("--callgrind-toggle", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--inference", type=int, metavar="TOKENS", help="inference streams of TOKENS tokens")
    parser.add_argument("--api", choices=("seed", "openai"), default="seed", help="with --inference")
    parser.add_argument("--no-coalesce", action="store_true", help="with --inference: --coalesce off")
    args = parser.parse_args()
    import uvloop

    if args.inference:
        proc, addr = echo_worker()
        try:
            # One loop for every run, as a serving process has.
            async def every_run() -> list[float]:
                coalesce = not args.no_coalesce
                return [
                    await inference_once(args.requests, addr, args.api, args.inference, coalesce)
                    for _ in range(args.runs)
                ]

            runs = uvloop.run(every_run())
        finally:
            proc.terminate()
            proc.wait(10)
        per_token = [r / args.inference for r in runs]
        print(
            f"CPU per {args.api} inference request of {args.inference} tokens: median {statistics.median(runs):.1f} us, "
            f"{statistics.median(per_token):.1f} us per token "
            f"(runs: {', '.join(f'{r:.1f}' for r in runs)}; {args.requests} requests)"
        )
        return

    what = (
        "CONNECT tunnel"
        if args.connect
        else "proxied request on a new connection"
        if args.new_connections
        else "proxied request"
    )
    if args.callgrind_toggle:
        # Under callgrind (see instructions_per_request): count only the measured run.
        uvloop.run(one_run(args, min(300, args.requests)))
        subprocess.run(["callgrind_control", "-i", "on", str(os.getpid())], check=True, stdout=subprocess.DEVNULL)
        uvloop.run(one_run(args, args.requests))
        subprocess.run(["callgrind_control", "-i", "off", str(os.getpid())], check=True, stdout=subprocess.DEVNULL)
        return
    if args.instructions:
        print(f"instructions per {what}: {instructions_per_request(args):,.0f} (callgrind, {args.requests} requests)")
        return
    runs = [uvloop.run(one_run(args, args.requests)) for _ in range(args.runs)]
    print(
        f"CPU per {what}: median {statistics.median(runs):.1f} us "
        f"(runs: {', '.join(f'{r:.1f}' for r in runs)}; {args.requests} requests, {args.clients} client(s))"
    )


def one_run(args: argparse.Namespace, requests: int) -> Coroutine[Any, Any, float]:
    if args.connect:
        return floor_once(requests, args.relay) if args.floor else connect_once(requests, args.relay, args.processes)
    if args.new_connections:
        return new_connection_once(requests, args.processes)
    return run_once(requests, args.clients, args.processes)


def instructions_per_request(args: argparse.Namespace) -> float:
    """Instructions per request of the measured part, counted by callgrind: the same
    count whatever else the machine is doing, so before/after comparisons of a few
    percent hold on a noisy machine where CPU time does not.

    Two runs, of N and 2N requests: what does not grow with the requests
    (building the gateway) cancels out in the difference.
    """
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--instructions needs valgrind: apt-get install -y valgrind")
    mode = (
        ["--connect", "--relay", str(args.relay), *(["--floor"] if args.floor else [])]
        if args.connect
        else ["--new-connections"]
        if args.new_connections
        else []
    )
    counts = []
    for n in (args.requests, 2 * args.requests):
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            *mode,
            "--clients",
            str(args.clients),
            "--processes",
            str(args.processes),
            "--requests",
            str(n),
            "--callgrind-toggle",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = re.search(r"Collected : (\d+)", done.stderr)
        if done.returncode or not found:
            raise SystemExit(f"callgrind failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / args.requests


if __name__ == "__main__":
    main()
