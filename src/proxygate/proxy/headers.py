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


def end_to_end(headers: Headers, *, drop: frozenset[bytes] = frozenset()) -> Headers:
    """The headers to forward: hop-by-hop ones removed, including every one the
    `Connection` header names, and any in `drop` (lower-case names)."""
    lowered = [name.lower() for name, _ in headers]
    named: set[bytes] = set()
    for lname, (_, value) in zip(lowered, headers, strict=True):
        if lname == b"connection" or lname == b"proxy-connection":
            named.update(t.strip().lower() for t in value.split(b","))
    return [
        header
        for lname, header in zip(lowered, headers, strict=True)
        if lname not in HOP_BY_HOP and lname not in drop and lname not in named
    ]
