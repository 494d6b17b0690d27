"""CONNECT tunnels: after `200`, bytes flow both ways until both sides are done.

The relay is two protocol objects, one on each socket, writing into each
other's transports with no task in between: the client's socket leaves HTTP
(`ClientConnection.detach`) for the `Tunnel` itself, the upstream one is
dialled with `UpstreamSide`. A full write buffer on one side pauses reading on the
other (flow control), an EOF from one side becomes a half-close towards the
other, and a tunnel with no bytes either way for the idle timeout is closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..http.deadline import IDLE
from ..http.exchange import Exchange


class Tunnel(asyncio.Protocol):
    """Both ends of one tunnel, its byte counts, and why it ended; once started, the
    client socket's protocol (its bytes go upstream).

    `on_end` is called once, when both sides are closed, with the reason; the
    CONNECT's exchange is open until then (`Exchange.outlive_handler`).
    """

    def __init__(self, exchange: Exchange, idle_timeout: float, on_end: Callable[[Tunnel, str], None]) -> None:
        self.exchange = exchange
        client = self.client = exchange.conn
        # The client's socket, the same transport before and after `detach`: once the
        # tunnel has it, bytes, half-closes and the close go to it directly.
        self.client_transport = client.transport
        self.idle_timeout = idle_timeout
        self.on_end = on_end
        self.upstream: asyncio.Transport | None = None
        self.bytes_up = 0  # client → upstream
        self.bytes_down = 0  # upstream → client
        self.ended = False
        self.client_eof = False
        self.upstream_eof = False
        self.now = client.loop.time  # the loop's clock: read once per pass, no system call
        self.last_activity = self.now()

    def start(self) -> None:
        """The 200 is written: take the client's socket and relay from now on, watching for idleness."""
        # The connection's deadline comes with its socket: the idle timeout runs on the
        # loop timer it already has (its read timeout's, sooner than ours), not a new one.
        tail = self.client.detach(self, self._idle_deadline)
        # From here on what comes from upstream is written to the client directly (one
        # message per loop pass; holding it for the pass's end gains nothing), after the
        # 200 (`Exchange.start_raw` sent it at once). Nothing of this connection goes
        # through the write batch any more.
        if tail:
            self.data_received(tail)
        if self.idle_timeout > 0:
            self.client.deadline.arm(self.idle_timeout, IDLE)

    def _idle_deadline(self, kind: int) -> None:
        """Bytes moving only note the time; when the deadline passes, it is moved on by the time they moved."""
        idle = self.now() - self.last_activity
        if idle >= self.idle_timeout:
            self.finish("idle timeout")
        else:
            self.client.deadline.arm(self.idle_timeout - idle, IDLE)

    # ---- the client socket's protocol, from `start` on ----

    def data_received(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self.last_activity = self.now()
        if self.upstream is not None:
            self.upstream.write(data)

    def eof_received(self) -> bool:
        self.client_eof = True
        upstream = self.upstream
        if self.upstream_eof or upstream is None or not upstream.can_write_eof():
            self.finish("closed")
        else:
            upstream.write_eof()
        return True  # keep our sending half open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish("client closed")
        self.client.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.resume_reading()

    def finish(self, why: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.client.deadline.cancel()
        if self.upstream is not None:
            self.upstream.close()
        if self.client_transport is not None:
            self.client_transport.close()
        self.on_end(self, why)


class UpstreamSide(asyncio.Protocol):
    """The upstream socket's protocol: its bytes go to the client."""

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.tunnel.upstream = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        tunnel.bytes_down += len(data)
        tunnel.last_activity = tunnel.now()
        client = tunnel.client_transport
        if client is not None and not client.is_closing():
            client.write(data)

    def eof_received(self) -> bool:
        tunnel = self.tunnel
        tunnel.upstream_eof = True
        client = tunnel.client_transport
        if tunnel.client_eof or client is None or client.is_closing() or not client.can_write_eof():
            tunnel.finish("closed")
            return False
        client.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.finish("upstream error" if exc else "closed")

    def pause_writing(self) -> None:
        if self.tunnel.client_transport is not None:
            self.tunnel.client_transport.pause_reading()

    def resume_writing(self) -> None:
        client = self.tunnel.client_transport
        if client is not None and not client.is_closing():
            client.resume_reading()
