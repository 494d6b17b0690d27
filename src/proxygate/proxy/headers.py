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
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() in (b"connection", b"proxy-connection"):
            named.update(t.strip().lower() for t in value.split(b","))
    out: Headers = []
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname in drop or (named and lname in named):
            continue
        out.append((name, value))
    return out
