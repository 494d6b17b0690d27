"""The gateway's own endpoints besides the inference APIs: health, readiness, metrics, status.

They hang on the same `ApiRouter` as the inference plane's. Their paths are
exempt from the rate limit unless `--rate-limit-health` says otherwise
(`HEALTH_PATHS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .api import ApiRouter, Handler
from .http.exchange import Exchange
from .http.message import Request
from .observability.metrics import GatewayMetrics
from .status import StatusBoard, page

HEALTH_PATHS = frozenset({b"/metrics", b"/healthz", b"/readyz", b"/status", b"/status.json"})
_JSON = (b"Content-Type", b"application/json")
_NO_STORE = (b"Cache-Control", b"no-store")


@dataclass
class Lifecycle:
    """Where the process stands, as /readyz reports it."""

    ready: bool = False  # listening, inference plane started
    shutting_down: bool = False


class OwnEndpoints:
    def __init__(self, metrics: GatewayMetrics, board: StatusBoard, lifecycle: Lifecycle) -> None:
        self.metrics = metrics
        self.board = board
        self.lifecycle = lifecycle
        self._status_html = page()

    def register(self, api: ApiRouter, *, status_json: Handler | None = None) -> None:
        """Add the routes; `status_json` replaces ours where another process owns the inference plane."""
        api.add("/metrics", ("GET",), self.metrics_text)
        api.add("/healthz", ("GET",), self.healthz)
        api.add("/readyz", ("GET",), self.readyz)
        api.add("/status", ("GET",), self.status_page)
        api.add("/status.json", ("GET",), status_json or self.status_json)

    async def metrics_text(self, req: Request, ex: Exchange) -> None:
        await self.metrics.refresh()
        ex.send(200, [(b"Content-Type", self.metrics.content_type.encode())], self.metrics.render())

    async def status_page(self, req: Request, ex: Exchange) -> None:
        ex.send(200, [(b"Content-Type", b"text/html; charset=utf-8"), _NO_STORE], self._status_html)

    async def status_json(self, req: Request, ex: Exchange) -> None:
        await self.metrics.refresh()
        body = json.dumps(self.board.snapshot(), separators=(",", ":")).encode()
        ex.send(200, [_JSON, _NO_STORE], body)

    async def healthz(self, req: Request, ex: Exchange) -> None:
        ex.send(200, [_JSON], b'{"status":"ok"}\n')

    async def readyz(self, req: Request, ex: Exchange) -> None:
        state = self.lifecycle
        if state.ready and not state.shutting_down:
            ex.send(200, [_JSON], b'{"status":"ready"}\n')
        else:
            word = b"shutting down" if state.shutting_down else b"starting"
            ex.send(503, [_JSON, (b"Retry-After", b"5")], b'{"status":"%s"}\n' % word)
