"""Origin-form requests to the gateway itself: health, readiness, metrics.

A table of exact paths to handlers; everything else is 404. Later planes
(inference, OpenAI) register their routes on the same table.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import MethodNotAllowed, NotFound
from .http.message import Request

if TYPE_CHECKING:
    from .http.connection import ClientConnection

Handler = Callable[[Request, "ClientConnection"], Awaitable[None]]


class ApiRouter:
    def __init__(self) -> None:
        self._routes: dict[bytes, tuple[frozenset[str], Handler]] = {}

    def add(self, path: str, methods: tuple[str, ...], handler: Handler) -> None:
        allowed = frozenset(methods) | ({"HEAD"} if "GET" in methods else frozenset())
        self._routes[path.encode()] = (allowed, handler)

    async def dispatch(self, req: Request, path: bytes, conn: ClientConnection) -> None:
        route = self._routes.get(path)
        if route is None:
            raise NotFound(f"no such endpoint: {path.decode('latin-1')[:200]}")
        methods, handler = route
        if req.method not in methods:
            allow = ", ".join(sorted(methods))
            raise MethodNotAllowed(f"{req.method} not allowed here", headers=[(b"Allow", allow.encode())])
        await handler(req, conn)


def origin_path(target: bytes) -> bytes:
    """The path of an origin-form target, without query or fragment."""
    end = len(target)
    for sep in (b"?", b"#"):
        pos = target.find(sep)
        if pos != -1 and pos < end:
            end = pos
    return target[:end]
