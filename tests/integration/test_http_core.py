"""The HTTP/1.1 core against raw sockets: pipelining, limits, timeouts, hostile bytes."""

from __future__ import annotations

import socket
import time

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.gateway import GatewayProcess, RawResponses
from tests.support.origin import Origin, pattern_bytes
from tests.support.waiting import metric, wait_for


def test_pipelined_requests_answered_in_order(gateway: GatewayProcess, origin: Origin) -> None:
    sock = gateway.connect()
    paths = ["/bytes/100", "/hello", "/chunked/50", "/status/204", "/bytes/7"]
    batch = b"".join(
        f"GET {origin.url}{p} HTTP/1.1\r\nHost: x\r\nX-Request-ID: req-{i}\r\n\r\n".encode()
        for i, p in enumerate(paths)
    )
    batch += b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: req-local\r\n\r\n"
    sock.sendall(batch)
    reader = RawResponses(sock)
    for i, path in enumerate(paths):
        status, headers, body = reader.next()
        assert headers["x-request-id"] == f"req-{i}", path
    status, headers, body = reader.next()
    assert headers["x-request-id"] == "req-local" and status == 200


def test_pipelined_requests_then_half_close_are_all_answered(gateway: GatewayProcess, origin: Origin) -> None:
    """`printf 'GET ..GET ..' | nc`: the client sends its requests and its FIN at once; every
    request received before the FIN is answered, the last with Connection: close, then EOF."""
    sock = gateway.connect()
    sock.sendall(
        f"GET {origin.url}/hello HTTP/1.1\r\nHost: x\r\nX-Request-ID: first\r\n\r\n".encode()
        + b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: second\r\n\r\n"
    )
    sock.shutdown(socket.SHUT_WR)
    reader = RawResponses(sock)
    status, headers, _ = reader.next()
    assert status == 200 and headers["x-request-id"] == "first" and "connection" not in headers
    status, headers, _ = reader.next()
    assert status == 200 and headers["x-request-id"] == "second" and headers["connection"] == "close"
    assert reader.closed()


def test_keep_alive_and_http10(gateway: GatewayProcess) -> None:
    sock = gateway.connect()
    reader = RawResponses(sock)
    for _ in range(3):
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.next()[0] == 200
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, _ = reader.next()
    assert headers["connection"] == "close"
    assert reader.closed()
    sock = gateway.connect()
    sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
    reader = RawResponses(sock)
    assert reader.next()[0] == 200
    assert reader.closed()


def test_headers_over_limit_get_431(gateway: GatewayProcess) -> None:
    sock = gateway.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
    status, _, _ = RawResponses(sock).next()
    assert status == 431
    sock = gateway.connect()
    sock.sendall(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n")
    assert RawResponses(sock).next()[0] == 431
    # Many small headers add up too.
    sock = gateway.connect()
    sock.sendall(b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 60) for i in range(2000)) + b"\r\n")
    assert RawResponses(sock).next()[0] == 431


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
    b"GET / HTTP/1.1\r\n: novalue\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\tfolded\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n\x00\x01\x02",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS ClientHello
    b"GET /\x00 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-A: \x00\r\n\r\n",
    b"G\xffT / HTTP/1.1\r\n\r\n",
    b"GET http://[::1 HTTP/1.1\r\n\r\n",
    b"GET http:// HTTP/1.1\r\n\r\n",
    b"GET ftp://example.com/ HTTP/1.1\r\n\r\n",
    b"GET https://example.com/ HTTP/1.1\r\n\r\n",
    b"GET example.com HTTP/1.1\r\n\r\n",
    b"CONNECT HTTP/1.1\r\n\r\n",
    b"CONNECT example.com HTTP/1.1\r\n\r\n",
    b"CONNECT [::1:443 HTTP/1.1\r\n\r\n",
    b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
    b"CONNECT example.com:70000 HTTP/1.1\r\n\r\n",
    b"CONNECT user@example.com:443 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nExpect: something-else\r\n\r\n",
    b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"\r\n\r\n\r\n\r\n",
    b"GET  / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
]


def _answer_or_close(gw: GatewayProcess, data: bytes) -> int | None:
    """The status the gateway answers `data` with, or None for a clean close."""
    sock = gw.connect()
    try:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        reader = RawResponses(sock, timeout=10)
        try:
            return reader.next()[0]
        except ConnectionError:
            return None
    finally:
        sock.close()


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests(gateway: GatewayProcess, data: bytes) -> None:
    status = _answer_or_close(gateway, data)
    assert status is None or 400 <= status < 500, status
    gateway.assert_alive()
    assert requests.get(f"{gateway.proxy}/healthz", timeout=5).status_code == 200


def test_malformed_after_good_pipelined_request(gateway: GatewayProcess) -> None:
    sock = gateway.connect()
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nBROKEN REQUEST\r\n\r\n")
    reader = RawResponses(sock)
    assert reader.next()[0] == 200
    assert reader.next()[0] == 400
    assert reader.closed()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda m, t, h: m + b" " + t + b" HTTP/1.1\r\n" + h + b"\r\n\r\n",
            st.sampled_from([b"GET", b"POST", b"CONNECT", b"HEAD", b"X"]),
            st.binary(max_size=40),
            st.binary(max_size=120),
        ),
    )
)
def test_random_bytes_never_hurt(gateway: GatewayProcess, data: bytes) -> None:
    status = _answer_or_close(gateway, data)
    assert status is None or 200 <= status < 600
    gateway.assert_alive()


def test_gateway_healthy_after_fuzzing(gateway: GatewayProcess, origin: Origin) -> None:
    r = requests.get(f"{origin.url}/bytes/1000", proxies={"http": gateway.proxy}, timeout=10)
    assert r.content == pattern_bytes(1000)
    assert "Traceback" not in gateway.log()


def test_slowloris_cut_off_by_read_timeout(start_gateway) -> None:
    gw = start_gateway("-read-timeout", "1s")
    sock = gw.connect()
    sock.settimeout(10)
    start = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")
    closed_at = None
    try:
        for _ in range(40):
            sock.sendall(b"X-Drip: 1\r\n")
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        closed_at = time.monotonic() - start
    if closed_at is None:
        data = sock.recv(1000)
        closed_at = time.monotonic() - start
        assert data.startswith(b"HTTP/1.1 408") or data == b""
    assert closed_at < 4.5


def test_idle_keepalive_connection_closed(start_gateway) -> None:
    gw = start_gateway("-idle-timeout", "1s")
    sock = gw.connect()
    reader = RawResponses(sock)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reader.next()[0] == 200
    start = time.monotonic()
    assert reader.closed()
    assert 0.5 < time.monotonic() - start < 5


def test_write_timeout_cuts_stalled_reader_not_long_download(start_gateway, origin: Origin) -> None:
    gw = start_gateway("-write-timeout", "1s")
    # A healthy slow response that lasts well past the write timeout.
    r = requests.get(f"{origin.url}/slow/6/3", proxies={"http": gw.proxy}, timeout=20)
    assert r.status_code == 200 and r.text.count("chunk") == 6
    # A client that stops reading a big response is cut after ~1 s of stall.
    open_before = metric(gw, "proxy_active_connections")
    sock = gw.connect()
    sock.sendall(f"GET {origin.url}/bytes/{200 * 1024 * 1024} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    # Not reading: the gateway's buffers fill, the write stalls (for 1 s), and the connection goes.
    wait_for(lambda: metric(gw, "proxy_active_connections") == open_before + 1, "the connection counted")
    wait_for(lambda: metric(gw, "proxy_active_connections") == open_before, "the stalled connection cut")
    sock.settimeout(10)
    got = 0
    try:
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        pass
    assert got < 64 * 1024 * 1024, f"a stalled reader was not cut off ({got} bytes sent)"
    gw.assert_alive()
