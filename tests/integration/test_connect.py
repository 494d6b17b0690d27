"""CONNECT tunnels and the destination policy, through the real gateway."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import time

import requests

from tests.conftest import require_binary
from tests.support.gateway import GatewayProcess, RawResponses
from tests.support.origin import EchoTcpServer, Origin, pattern_bytes


def open_tunnel(gw: GatewayProcess, port: int, host: str = "127.0.0.1") -> socket.socket:
    sock = gw.connect()
    sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1)
        assert data, f"closed during CONNECT: {head!r}"
        head += data
    assert head.startswith(b"HTTP/1.1 200"), head
    return sock


def test_curl_https_through_tunnel(gateway: GatewayProcess, tls_origin: Origin, ca_file: str) -> None:
    curl = require_binary("curl", "curl")
    out = subprocess.run(
        [curl, "-sS", "--cacert", ca_file, "-x", gateway.proxy, f"{tls_origin.url}/hello"],
        capture_output=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == b"hello"


def test_requests_https_through_tunnel(gateway: GatewayProcess, tls_origin: Origin, ca_file: str) -> None:
    with requests.Session() as s:
        s.proxies = {"https": gateway.proxy}
        r = s.get(f"{tls_origin.url}/bytes/200000", timeout=10, verify=ca_file)
        assert r.content == pattern_bytes(200000)
        r = s.post(f"{tls_origin.url}/echo", data=b"z" * 100000, timeout=10, verify=ca_file)
        assert r.json()["length"] == 100000


def test_half_close_propagates(gateway: GatewayProcess, echo_server: EchoTcpServer) -> None:
    sock = open_tunnel(gateway, echo_server.port)
    payload = pattern_bytes(300_000)
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)  # our half-close must reach the echo server...
    got = b""
    sock.settimeout(10)
    while chunk := sock.recv(65536):
        got += chunk
    # ...which then half-closes back; we saw everything and then EOF.
    assert got == payload
    sock.close()


def test_tunnel_idle_timeout(start_gateway, echo_server: EchoTcpServer) -> None:
    gw = start_gateway("-idle-timeout", "1s")
    sock = open_tunnel(gw, echo_server.port)
    sock.sendall(b"ping")
    sock.settimeout(10)
    assert sock.recv(10) == b"ping"
    start = time.monotonic()
    assert sock.recv(10) == b""  # closed by the gateway
    assert 0.5 < time.monotonic() - start < 5
    gw.wait_log(r'"method":"CONNECT"')


def test_50mib_through_tunnel_bounded_memory(start_gateway, echo_server: EchoTcpServer) -> None:
    gw = start_gateway()
    base = gw.rss_kib()
    sock = open_tunnel(gw, echo_server.port)
    size = 50 * 1024 * 1024
    chunk = pattern_bytes(1 << 16)
    sent = received = 0
    digest = hashlib.sha256()
    sock.setblocking(False)
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.monotonic() + 60
    pending = b""
    while received < size and time.monotonic() < deadline:
        for _key, events in sel.select(1):
            if events & selectors.EVENT_WRITE and sent < size:
                if not pending:
                    pending = chunk[: min(len(chunk), size - sent)]
                n = sock.send(pending)
                sent += n
                pending = pending[n:]
                if sent >= size:
                    sel.modify(sock, selectors.EVENT_READ)
            if events & selectors.EVENT_READ:
                data = sock.recv(1 << 16)
                assert data
                received += len(data)
                digest.update(data)
    assert received == size
    sock.close()
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    growth_mib = (gw.peak_rss_kib() - base) / 1024
    assert growth_mib < 16, f"gateway RSS grew {growth_mib:.1f} MiB relaying 2×50 MiB"


def test_connect_policy_defaults(start_gateway, echo_server: EchoTcpServer) -> None:
    gw = start_gateway(policy=False)
    # Non-443 port refused.
    sock = gw.connect()
    sock.sendall(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n\r\n".encode())
    status, _, body = RawResponses(sock).next()
    assert status == 403 and b"connect-ports" in body
    # Port 443 allowed by the port rule, but loopback is a denied destination.
    sock = gw.connect()
    sock.sendall(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n")
    status, _, body = RawResponses(sock).next()
    assert status == 403 and b"deny-destinations 127.0.0.0/8" in body
    sock = gw.connect()
    sock.sendall(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n")
    status, _, body = RawResponses(sock).next()
    assert status == 403 and b"deny-destinations" in body
    gw.assert_alive()


def test_forward_policy_defaults(start_gateway, origin: Origin) -> None:
    gw = start_gateway(policy=False)
    r = requests.get(f"{origin.url}/hello", proxies={"http": gw.proxy}, timeout=10)
    assert r.status_code == 403 and "deny-destinations 127.0.0.0/8" in r.text
    r = requests.get(f"http://localhost:{origin.port}/hello", proxies={"http": gw.proxy}, timeout=10)
    assert r.status_code == 403


def test_loop_to_own_listener_refused(start_gateway) -> None:
    gw = start_gateway()  # open policy: only the loop rule stops this
    sock = gw.connect()
    sock.sendall(f"CONNECT 127.0.0.1:{gw.port} HTTP/1.1\r\n\r\n".encode())
    status, _, body = RawResponses(sock).next()
    assert status == 403 and b"loop" in body


def test_own_metrics_never_served_for_other_hosts(gateway: GatewayProcess, origin: Origin) -> None:
    r = requests.get(f"{origin.url}/metrics", proxies={"http": gateway.proxy}, timeout=10)
    assert r.text == "origin metrics\n"
    # Naming the gateway's own address is a request to us.
    r = requests.get(f"http://127.0.0.1:{gateway.port}/metrics", proxies={"http": gateway.proxy}, timeout=10)
    assert "proxy_requests_total" in r.text


def test_connect_blocked_and_failures(gateway: GatewayProcess) -> None:
    sock = gateway.connect()
    sock.sendall(b"CONNECT x.ads.test:443 HTTP/1.1\r\n\r\n")
    status, headers, body = RawResponses(sock).next()
    assert status == 403 and body == b""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    sock = gateway.connect()
    sock.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\n\r\n".encode())
    status, _, body = RawResponses(sock).next()
    assert status == 502 and b"refused" in body
    for bad in (b"CONNECT nohost HTTP/1.1\r\n\r\n", b"CONNECT a:99999 HTTP/1.1\r\n\r\n"):
        sock = gateway.connect()
        sock.sendall(bad)
        status, _, _ = RawResponses(sock).next()
        assert status == 400, bad
