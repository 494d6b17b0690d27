"""Errors the gateway answers with a status code, in one small hierarchy.

Handlers raise; the connection turns an `HttpError` into a response in one
place. `status` is the code, `reason` the one-line text body a user sees.
"""

from __future__ import annotations

Headers = list[tuple[bytes, bytes]]


class HttpError(Exception):
    status = 500

    def __init__(self, reason: str, *, headers: Headers | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers: Headers = headers or []


class BadRequest(HttpError):
    status = 400


class Unauthorized(HttpError):
    status = 401


class Forbidden(HttpError):
    status = 403


class NotFound(HttpError):
    status = 404


class MethodNotAllowed(HttpError):
    status = 405


class ProxyAuthRequired(HttpError):
    status = 407

    def __init__(self, reason: str) -> None:
        super().__init__(reason, headers=[(b"Proxy-Authenticate", b'Basic realm="proxygate"')])


class RequestTimeout(HttpError):
    status = 408


class PayloadTooLarge(HttpError):
    status = 413


class TooManyRequests(HttpError):
    status = 429


class HeadersTooLarge(HttpError):
    status = 431


class NotImplementedHttp(HttpError):
    """501: a request feature we do not implement (a transfer coding)."""

    status = 501


class BadGateway(HttpError):
    status = 502


class ServiceUnavailable(HttpError):
    status = 503


class GatewayTimeout(HttpError):
    status = 504


class DestinationDenied(Forbidden):
    """A proxied destination refused by policy (port, address range, loop)."""


class WriteStalled(Exception):
    """The peer stopped reading our bytes for longer than the write timeout."""
