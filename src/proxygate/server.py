"""Process lifecycle of `proxygate gateway`: listen, serve, reload, drain, exit.

Signals: SIGTERM/SIGINT stop accepting at once and let in-flight requests and
tunnels finish within -shutdown-timeout; SIGHUP reloads the blocklist and the
routes file, each also reloaded when its file changes on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from .config import GatewaySettings
from .gateway import Gateway
from .http.connection import ClientConnection
from .inference.handoff import HandoffReceiver, handoff_path
from .inference.routes import RoutesError
from .listeners import BACKLOG, listening_url, open_listeners, take_queued
from .policy.blocklist import BlocklistError
from .policy.keys import KeysError
from .policy.ratelimit import LimiterUnavailable, MemoryLimiter, RedisLimiter
from .wiring import build_gateway

log = logging.getLogger("proxygate.server")

WATCH_INTERVAL = 1.0
# Stop (drain) and reload; a serving process is forked with them blocked (`prefork.py`).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FLUSH_INTERVAL = 0.25
# How long a process that does not own the inference plane waits, at start, for
# the one that does to take handoffs (it starts them before it reports ready).
OWNER_START_WAIT = 10.0
# Young-generation size before a collection; the older generations' ratios.
GC_THRESHOLDS = (10_000, 20, 100)


def tls_context(settings: GatewaySettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.pem, settings.key)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _housekeeping(gateway: Gateway) -> None:
    """Blocklist file watch, idle upstream sweep, access-log flush, metrics for peer processes."""
    ticks_per_watch = max(1, int(WATCH_INTERVAL / FLUSH_INTERVAL))
    tick = 0
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        gateway.access_log.flush()
        tick += 1
        if tick % ticks_per_watch == 0:
            for watched in gateway.watched_files():
                if watched.changed_on_disk():
                    watched.reload()
            gateway.pool.sweep()
            gateway.metrics.publish()
            if isinstance(gateway.limiter, MemoryLimiter) and tick % (ticks_per_watch * 30) == 0:
                gateway.limiter.sweep()


def _quiet_gc() -> None:
    """Keep the cyclic garbage collector out of the latency tail.

    With CPython's defaults a serving process under load runs a full
    collection every few seconds, and each walks every object the process
    holds (modules, gRPC, prometheus, the tables built at start): at c=64 the
    p99 of one process was 17-19 ms, against 6-8 ms with the objects that
    exist once serving starts frozen out of collections (`gc.freeze`), or
    5-6 ms with collections rarer, and the req/s went up 5-10 %. Both are
    done; cycles made while serving are still collected.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def _adopt(gateway: Gateway, sock: socket.socket, preface: bytes) -> None:
    """Serve a client connection a sibling process handed over, starting with the bytes it read."""
    loop = asyncio.get_running_loop()
    try:
        await loop.connect_accepted_socket(lambda: ClientConnection(gateway, preface, loop), sock)
    finally:
        # Counted once the connection counts among ours (or is gone): no longer on its way.
        if gateway.parts.owner_load is not None:
            gateway.parts.owner_load.adopted()


async def _answer_queued(
    gateway: Gateway, queued: list[socket.socket], ssl_ctx: ssl.SSLContext | None, within: float
) -> None:
    """Serve the connections taken from the accept queue at a stop (`take_queued`), as a
    draining gateway serves: their first requests answered (within the read timeout),
    then closed. Opened all at once (a TLS one after its handshake), for at most `within`
    seconds."""
    loop = asyncio.get_running_loop()

    async def adopt(sock: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(lambda: ClientConnection(gateway, loop=loop), sock, ssl=ssl_ctx)
        except (OSError, asyncio.TimeoutError):  # the client left, or its TLS handshake failed
            sock.close()

    if not queued:
        return
    _, late = await asyncio.wait([loop.create_task(adopt(sock)) for sock in queued], timeout=within)
    for task in late:
        task.cancel()


async def _unless_stopped(work: Coroutine[Any, Any, bool], stop: asyncio.Event) -> bool:
    """What `work` returns, or False once `stop` is set first (and `work` cancelled)."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False
    return task.result()


async def serve(
    settings: GatewaySettings,
    gateway: Gateway | None = None,
    *,
    listeners: list[socket.socket] | None = None,
    on_listening: Callable[[int], None] | None = None,
    inference_socket: str = "",
) -> int:
    """Run the gateway until a stop signal; the process exit code.

    One of several processes (`prefork`) gets its `listeners` and reports
    readiness through `on_listening`; alone, it opens and announces its own.
    The one that owns the inference plane for the others also serves their
    relayed requests on `inference_socket`.
    """
    gateway = gateway or build_gateway(settings)
    try:
        gateway.blocklist.load_initial()
    except (OSError, BlocklistError, UnicodeDecodeError) as exc:
        log.error("cannot load blocklist %s: %s", settings.blocklist, exc)
        return 1
    if gateway.keys is not None:
        try:
            gateway.keys.load_initial()
        except (OSError, KeysError, UnicodeDecodeError) as exc:
            log.error("cannot load api keys %s: %s", gateway.keys.path, exc)
            return 1
    routes = gateway.inference.routes if gateway.inference is not None else None
    if routes is not None and routes.path:
        try:
            routes.load_initial()
        except (OSError, RoutesError, UnicodeDecodeError) as exc:
            log.error("cannot load routes %s: %s", routes.path, exc)
            return 1
    if isinstance(gateway.limiter, RedisLimiter):
        try:
            await gateway.limiter.ping()
        except LimiterUnavailable as exc:
            log.error("%s (-limiter redis needs a reachable Redis at start)", exc)
            return 1
    loop = asyncio.get_running_loop()
    # Handlers once the files are loaded (SIGHUP reloads them), and before anyone learns
    # that we listen: whoever waits for "listening on" (or the supervisor, for the
    # processes' readiness) may signal at once, and SIGHUP's or SIGTERM's default action
    # would end the process. A stop asked for while starting is honoured once started.
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, gateway.reload_files)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # held until now in a forked process
    ssl_ctx = None
    if settings.proto == "https":
        try:
            ssl_ctx = tls_context(settings)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot load TLS certificate/key: %s", exc)
            return 1
    host, port = settings.listen
    handoffs: HandoffReceiver | None = None
    if gateway.parts.handoff is not None:
        reached = await _unless_stopped(gateway.parts.handoff.connect(within=OWNER_START_WAIT), stop)
        if stop.is_set():
            return 0  # stopped while starting (process 0 could not start, say): nothing to drain
        if not reached:
            log.warning("the inference plane's owner is not reachable yet; connections move once it is")
    try:
        socks = listeners if listeners is not None else open_listeners(host, port)
        servers = [
            await loop.create_server(
                lambda: ClientConnection(gateway, loop=loop), sock=sock, ssl=ssl_ctx, backlog=BACKLOG
            )
            for sock in socks
        ]
        if inference_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(inference_socket)  # left by a predecessor that crashed
            relayed = gateway.relayed_api()
            servers.append(
                await loop.create_unix_server(lambda: ClientConnection(relayed, loop=loop), path=inference_socket)
            )
            handoffs = HandoffReceiver(handoff_path(inference_socket), partial(_adopt, gateway))
            handoffs.start()
            log.info("process %d owns the inference plane; the others relay to %s", os.getpid(), inference_socket)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc)
        return 1
    gateway.metrics.answer_refreshes(loop)
    bound = socks[0].getsockname()
    gateway.bound(bound[1])
    if on_listening is not None:
        on_listening(bound[1])
    else:
        log.info("listening on %s", listening_url(settings.proto, socks[0]))
    if on_listening is None or inference_socket:  # once, not once per process
        log.info(
            "forward proxy open to %s; API %s",
            gateway.access.describe_proxy_access(),
            "needs an API key" if gateway.keys is not None else "open to every client",
        )

    _quiet_gc()
    housekeeping = loop.create_task(_housekeeping(gateway))
    try:
        await stop.wait()
    finally:
        log.info(
            "shutting down: draining %d connections (up to %gs)", len(gateway.connections), settings.shutdown_timeout
        )
        gateway.begin_shutdown()
        queued = take_queued(socks)
        for server in servers:
            server.close()
        if handoffs is not None:
            handoffs.close()
        started = loop.time()
        await _answer_queued(gateway, queued, ssl_ctx, settings.shutdown_timeout)
        aborted = await gateway.drain_connections(settings.shutdown_timeout - (loop.time() - started))
        if aborted:
            log.warning("shutdown timeout: closed %d connections still in flight", aborted)
        housekeeping.cancel()
        for sig in HANDLED_SIGNALS:
            loop.remove_signal_handler(sig)
        log.info("stopped")
        gateway.metrics.publish()
        gateway.metrics.stop_answering()
        gateway.access_log.flush()
        sys.stderr.flush()
    return 0
