"""HTTP/1.1 messages as plain objects, and the bytes of a response head.

Nothing here touches a socket: the connection fills a `Request`, a handler
reads it and renders a head with `render_head`.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from http import HTTPStatus

from .flow import BodyBuffer

Headers = list[tuple[bytes, bytes]]

_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}
_STATUS_LINES: dict[tuple[bytes, int], bytes] = {}

# A client-supplied request id is echoed only when it is a short, boring
# token; anything else could smuggle newlines or HTML into logs and pages.
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")


def status_line(version: bytes, status: int) -> bytes:
    key = (version, status)
    line = _STATUS_LINES.get(key)
    if line is None:
        line = b"HTTP/%s %d %s\r\n" % (version, status, _REASONS.get(status, b"Unknown"))
        if len(_STATUS_LINES) < 4096:
            _STATUS_LINES[key] = line
    return line


# Ids are a random per-process prefix and a counter: unique across restarts
# and replicas in practice, and far cheaper than reading urandom per request.
_ID_PREFIX = secrets.token_hex(5)
_ID_COUNTER = itertools.count(1)


def _new_id_prefix() -> None:
    # A forked serving process must not repeat its siblings' ids.
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = secrets.token_hex(5)
    _ID_COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_new_id_prefix)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):06x}"


def pick_request_id(supplied: bytes | None) -> str:
    if supplied is not None and _SANE_REQUEST_ID.fullmatch(supplied):
        return supplied.decode("ascii")
    return new_request_id()


@dataclass(slots=True, eq=False)
class Request:
    method: str
    target: bytes
    version: bytes  # b"1.1" / b"1.0"
    headers: Headers
    keep_alive: bool
    body: BodyBuffer | None
    request_id: str
    peer_ip: str
    host_header: bytes | None = None
    expect_continue: bool = False
    upgrade: bool = False
    content_length: int | None = None
    chunked: bool = False
    started: float = field(default_factory=time.perf_counter)
    # Header lines every response to this request carries (rate-limit
    # state), rendered once: `Name: value\r\n...`.
    extra_head: bytes = b""
    # Extra access-log fields a handler adds (the inference route and model).
    log_fields: tuple[tuple[str, str], ...] = ()
    # The API key's name once authenticated: the identity for limits and metrics.
    tenant: str = ""
    # Another process answered it and writes its access-log line (a relayed /v1/* request).
    logged_elsewhere: bool = False
    # Why it failed, when it did (an error answer, or a stream that broke off): the status page's recent errors.
    error: str = ""

    def header(self, name: bytes) -> bytes | None:
        """First value of a header, by lower-case name."""
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    @property
    def is_absolute_form(self) -> bool:
        # find(), not `b"://" in ...`: CPython's bytes `in` builds and drops a
        # TypeError (it first tries the needle as an int), per request.
        return self.target[:1] != b"/" and self.target.find(b"://", 0, 16) >= 0


@dataclass(slots=True, frozen=True)
class ParseFailure:
    """Stands in the request queue where unparseable bytes began."""

    error: Exception


def render_head(version: bytes, status: int, headers: Headers, tail: bytes = b"") -> bytes:
    """Status line, `headers`, then `tail` (header lines already rendered) and the blank line."""
    parts = [status_line(version, status)]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")  # one join at the end: no bytes made per header
    parts.append(tail)
    parts.append(b"\r\n")
    return b"".join(parts)
