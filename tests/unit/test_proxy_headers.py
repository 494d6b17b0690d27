"""Header rewriting at the proxy boundary (pure logic)."""

from __future__ import annotations

from proxygate.proxy.headers import HOP_BY_HOP, connection_tokens, end_to_end


def test_connection_tokens_single_and_listed() -> None:
    assert connection_tokens(b"close") == {b"close"}
    assert connection_tokens(b" Keep-Alive ") == {b"keep-alive"}
    assert connection_tokens(b"close, X-Secret-Hop,keep-alive") == {b"close", b"x-secret-hop", b"keep-alive"}


def test_end_to_end_drops_hop_by_hop_and_what_connection_names() -> None:
    headers = [
        (b"Host", b"o.test"),
        (b"Connection", b"close, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Accept", b"*/*"),
    ]
    assert end_to_end(headers, skip=HOP_BY_HOP) == [(b"Host", b"o.test"), (b"Accept", b"*/*")]
    # `Connection: close` alone names no header: everything else passes as it came.
    plain = [(b"Host", b"o.test"), (b"Connection", b"close"), (b"Accept", b"*/*")]
    assert end_to_end(plain, skip=HOP_BY_HOP) == [(b"Host", b"o.test"), (b"Accept", b"*/*")]
