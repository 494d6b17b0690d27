"""CONNECT tunnels: after `200`, bytes flow both ways until both sides are done.

The relay is two protocol objects writing into each other's transports, with
no task in between: a full write buffer on one side pauses reading on the
other (flow control), an EOF from one side becomes a half-close towards the
other, and a tunnel with no bytes either way for the idle timeout is closed.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..http.connection import ClientConnection


class Tunnel(asyncio.Protocol):
    """The upstream side of a tunnel and the sink of the client side."""

    def __init__(self, client: ClientConnection, idle_timeout: float) -> None:
        self.client = client
        self.idle_timeout = idle_timeout
        self.upstream: asyncio.Transport | None = None
        self.bytes_up = 0  # client → upstream
        self.bytes_down = 0  # upstream → client
        self.done: asyncio.Future[str] = client.loop.create_future()
        self._client_eof = False
        self._upstream_eof = False
        self._last_activity = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    # ---- upstream transport callbacks ---------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.upstream = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._last_activity = time.monotonic()
        self.client.write(data)

    def eof_received(self) -> bool:
        self._upstream_eof = True
        if self._client_eof or not self.client.write_eof():
            self._finish("closed")
            return False
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish("upstream error" if exc else "closed")

    def pause_writing(self) -> None:
        self.client.pause_client_reading()

    def resume_writing(self) -> None:
        self.client.resume_client_reading()

    # ---- client side (RelaySink) ---------------------------------------------

    def start(self) -> None:
        """The 200 is sent: relay from now on, watching for idleness."""
        self.client.become_relay(self)
        if self.idle_timeout > 0:
            self._timer = self.client.loop.call_later(self.idle_timeout, self._check_idle)

    def from_client(self, data: bytes) -> None:
        self.bytes_up += len(data)
        self._last_activity = time.monotonic()
        if self.upstream is not None:
            self.upstream.write(data)

    def client_eof(self) -> None:
        self._client_eof = True
        upstream = self.upstream
        if self._upstream_eof or upstream is None or not upstream.can_write_eof():
            self._finish("closed")
        else:
            upstream.write_eof()

    def client_lost(self) -> None:
        self._finish("client closed")

    def client_paused_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_resumed_writing(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.resume_reading()

    # ---- ending ----------------------------------------------------------------

    def _check_idle(self) -> None:
        idle = time.monotonic() - self._last_activity
        if idle >= self.idle_timeout:
            self._finish("idle timeout")
        else:
            self._timer = self.client.loop.call_later(self.idle_timeout - idle, self._check_idle)

    def _finish(self, why: str) -> None:
        if self.done.done():
            return
        if self._timer is not None:
            self._timer.cancel()
        if self.upstream is not None:
            self.upstream.close()
        self.client.close()
        self.done.set_result(why)
