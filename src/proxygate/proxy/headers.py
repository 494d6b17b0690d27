"""Header rewriting at the proxy boundary (RFC 9110 §7.6.1)."""

from __future__ import annotations

from ..http.message import Headers

# Hop-by-hop: meaningful for one connection only, never forwarded. The
# framing headers are here too: the proxy re-frames every body itself.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
CONNECTION_HEADERS = frozenset({b"connection", b"proxy-connection"})
_CLOSE = frozenset({b"close"})
# What a response loses on its way to the client: hop-by-hop headers, and the
# request id (every response carries ours).
RESPONSE_SKIP = HOP_BY_HOP | {b"x-request-id"}


def connection_tokens(value: bytes) -> set[bytes]:
    """The header names a `Connection` value lists (lower-case)."""
    # An int, not b",": CPython's `bytes in bytes` first tries the needle as an int
    # and builds and drops a TypeError (about 1,800 instructions); this runs per request.
    if 44 not in value:  # ord(",")
        return {value.strip().lower()}  # the usual `close` or `keep-alive`, without a split
    return {t.strip().lower() for t in value.split(b",")}


def end_to_end(headers: Headers, *, skip: frozenset[bytes] = HOP_BY_HOP) -> Headers:
    """The headers to forward: those in `skip` (lower-case names; HOP_BY_HOP
    and any the caller re-writes itself) removed, and every one the
    `Connection` header names."""
    out: Headers = []
    named: set[bytes] | None = None
    for header in headers:
        lname = header[0].lower()
        if lname in skip:
            if lname in CONNECTION_HEADERS:
                named = (named or set()) | connection_tokens(header[1])
            continue
        out.append(header)
    # `close` is a connection option, never a header's name (RFC 9110 7.6.1
    # reserves it): nothing to look for when it is all a request lists.
    return without_named(out, named.difference(skip, _CLOSE) if named else None)


def without_named(headers: Headers, named: set[bytes] | None) -> Headers:
    """`headers` less those a `Connection` header named (usually none are left
    to remove: `keep-alive` and `close` are hop-by-hop anyway)."""
    if not named:
        return headers
    return [h for h in headers if h[0].lower() not in named]
