"""Origin-form requests to the gateway itself: a table of exact paths to handlers.

Everything not in the table is 404. The gateway's own endpoints
(endpoints.py) and the inference plane's APIs register their routes here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from .errors import MethodNotAllowed, NotFound
from .http.message import Request

if TYPE_CHECKING:
    from .http.exchange import Exchange

Handler = Callable[[Request, "Exchange"], Awaitable[None]]


class ApiRouter:
    def __init__(self) -> None:
        self._routes: dict[bytes, tuple[frozenset[str], Handler]] = {}

    def add(self, path: str, methods: tuple[str, ...], handler: Handler) -> None:
        allowed = frozenset(methods) | ({"HEAD"} if "GET" in methods else frozenset())
        self._routes[path.encode()] = (allowed, handler)

    async def dispatch(self, req: Request, path: bytes, ex: Exchange) -> None:
        route = self._routes.get(path)
        if route is None:
            raise NotFound(f"no such endpoint: {path.decode('latin-1')[:200]}")
        methods, handler = route
        if req.method not in methods:
            allow = ", ".join(sorted(methods))
            raise MethodNotAllowed(f"{req.method} not allowed here", headers=[(b"Allow", allow.encode())])
        await handler(req, ex)


def origin_path(target: bytes) -> bytes:
    """The path of an origin-form target, without query or fragment."""
    # ord("?"), ord("#"): bytes `in` bytes builds and drops a TypeError in CPython.
    if 63 not in target and 35 not in target:
        return target  # the usual case, without a search per separator
    end = len(target)
    for sep in (b"?", b"#"):
        pos = target.find(sep)
        if pos != -1 and pos < end:
            end = pos
    return target[:end]
