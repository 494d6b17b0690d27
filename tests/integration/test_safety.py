"""Safe by default: what the out-of-the-box gateway refuses to proxy (SSRF spellings, ports)."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading

import requests

from tests.support.gateway import GatewayProcess
from tests.support.inference import events, wait_healthy
from tests.support.origin import Origin


def _raw_origin(response: bytes, host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    """An origin on `host` (`::`: every IPv6 address) that answers every connection's
    first request with `response` bytes, then holds it open."""
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    srv.bind((host, 0))
    srv.listen(8)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.recv(65536)
            conn.sendall(response)
            held.append(conn)  # never closed by us: the gateway must not wait for it

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def raw(gw: GatewayProcess, request: bytes) -> bytes:
    """Send `request` as bytes; the response head and its Content-Length body."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        match = re.search(rb"(?im)^content-length: *(\d+)", head)
        want = int(match.group(1)) if match else 0
        while len(body) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def test_unspecified_and_embedded_addresses_are_refused_by_default(start_gateway) -> None:
    srv, port = _raw_origin(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecret", host="::")
    try:
        gw = start_gateway(policy=False)
        spellings = ("[::]", "[::0]", "[0:0:0:0:0:0:0:0]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "0.0.0.0", "0")
        for host in (*spellings, "127.0.0.1.", "localhost."):  # a trailing dot: refused, not a 502
            answer = raw(gw, b"GET http://%s:%d/ HTTP/1.1\r\nHost: x\r\n\r\n" % (host.encode(), port))
            assert answer.startswith(b"HTTP/1.1 403"), (host, answer[:200])
            assert b"secret" not in answer
        for target in (b"[::]:443", b"[::0]:443", b"[::ffff:127.0.0.1]:443"):
            answer = raw(gw, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
            assert answer.startswith(b"HTTP/1.1 403"), (target, answer[:200])
    finally:
        srv.close()


def test_plain_http_only_to_safe_ports(start_gateway, origin: Origin) -> None:
    gw = start_gateway("--deny-destinations", "")
    refused = requests.get("http://127.0.0.1:25/", proxies={"http": gw.proxy}, timeout=10)
    assert refused.status_code == 403 and "--http-ports" in refused.text
    assert requests.get(f"{origin.url}/hello", proxies={"http": gw.proxy}, timeout=10).status_code == 200
    gw_any = start_gateway("--deny-destinations", "", "--http-ports", "*")
    assert requests.get("http://127.0.0.1:25/", proxies={"http": gw_any.proxy}, timeout=10).status_code == 502


def test_a_client_leaving_mid_upload_leaves_no_unobserved_exception(start_gateway) -> None:
    """The client goes while its body is still on the way upstream: the log gets no plain-text
    "Future exception was never retrieved" (it used to, for almost every such client)."""
    accepted = threading.Semaphore(0)
    closed = threading.Semaphore(0)
    origin = socket.socket()
    origin.bind(("127.0.0.1", 0))
    origin.listen(4)

    def hold() -> None:
        while True:
            try:
                conn, _ = origin.accept()
            except OSError:
                return
            accepted.release()
            with conn:
                while conn.recv(65536):
                    pass  # read, never answer, until the gateway drops the connection
            closed.release()

    threading.Thread(target=hold, daemon=True).start()
    gw = start_gateway()
    head = b"POST http://127.0.0.1:%d/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    try:
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", gw.port))
            client.sendall(head % origin.getsockname()[1] + b"x" * 1000)
            assert accepted.acquire(timeout=10)
            client.close()
            assert closed.acquire(timeout=10)
        gw.stop()
    finally:
        origin.close()
    assert "never retrieved" not in gw.log(), gw.log()[-2000:]


def test_rfc9112_request_rules(start_gateway) -> None:
    gw = start_gateway()
    cases = [
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400", b"more than one Host"),
        (b"GET /healthz HTTP/1.1\r\n\r\n", b"400", b"without a Host"),
        (b"POST /v1/inference HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", b"501", b"gzip"),
        (
            b"POST /v1/inference HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"400",
            b"",
        ),  # RFC 9112 6.3
        (b"POST /v1/inference HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", b"400", b"HTTP/1.0"),
        (b"GET /healthz\r\n\r\n", b"400", b""),
        (b"GET http://a..b/ HTTP/1.1\r\nHost: a\r\n\r\n", b"400", b"malformed host name"),
        (b"GET http://" + b"x" * 64 + b".com/ HTTP/1.1\r\nHost: a\r\n\r\n", b"400", b"malformed host name"),
        (b"CONNECT a..b:443 HTTP/1.1\r\n\r\n", b"400", b"malformed host name"),
    ]
    for request, status, reason in cases:
        answer = raw(gw, request)
        assert answer.startswith(b"HTTP/1.1 " + status), (request, answer[:300])
        assert reason in answer or not reason, (request, answer[:300])
    # HTTP/1.0 without Host, and CONNECT without Host, stay fine.
    assert raw(gw, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200")
    gw.assert_alive()


def test_a_stopped_worker_fails_or_retries_streams_within_the_token_timeout(start_gateway, start_worker) -> None:
    a = start_worker("--latency", "0.05")
    b = start_worker("--latency", "0.05")
    try:
        # A stream already running on a worker that stops: an error event, not a 5-minute wait.
        only_a = start_gateway("-worker-addrs", a.addr, "--token-timeout", "1s")
        wait_healthy(only_a)
        with requests.post(
            f"{only_a.proxy}/v1/inference", json={"prompt": "w " * 40, "max_tokens": 40}, stream=True, timeout=20
        ) as r:
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith(b"data:"))
            a.proc.send_signal(signal.SIGSTOP)
            rest = b"\n".join(lines)
        assert b"event: error" in rest and b"stalled" in rest

        # Nothing sent yet: the request moves to another worker and succeeds.
        a.proc.send_signal(signal.SIGCONT)
        both = start_gateway(
            "-worker-addrs", f"{a.addr},{b.addr}", "--token-timeout", "1s", "--routing-policy", "round-robin"
        )
        wait_healthy(both, 2)
        a.proc.send_signal(signal.SIGSTOP)
        answers = [
            requests.post(f"{both.proxy}/v1/inference", json={"prompt": f"x{i} y", "max_tokens": 5}, timeout=20)
            for i in range(2)
        ]  # round-robin: one of the two goes to the stopped worker first
        assert [r.status_code for r in answers] == [200, 200]
        assert all([d for e, d in events(r) if e == "message"] and "error" not in r.text for r in answers)
        both.wait_log("failed before the first token \\(STALLED\\); retrying")
    finally:
        a.proc.send_signal(signal.SIGCONT)


def test_bytes_after_a_complete_response_do_not_stall_the_client(start_gateway) -> None:
    srv, port = _raw_origin(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
    )
    try:
        gw = start_gateway()
        for _ in range(2):  # the second must not get the first's leftovers from a pooled connection
            r = requests.get(f"http://127.0.0.1:{port}/", proxies={"http": gw.proxy}, timeout=5)
            assert r.status_code == 200 and r.text == "ok"
    finally:
        srv.close()


def test_an_invalid_chunk_from_the_origin_is_not_logged_as_200(start_gateway) -> None:
    srv, port = _raw_origin(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nbad\r\n0\r\n\r\n"
    )
    try:
        gw = start_gateway()
        answer = raw(gw, b"GET http://127.0.0.1:%d/chunky HTTP/1.1\r\nHost: x\r\n\r\n" % port)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 200")  # cut: nothing, or a head already on its way
        line = gw.wait_log(r'\{[^\n]*"path":"/chunky"[^\n]*\}')
        assert '"status":502' in line, line
    finally:
        srv.close()


def test_a_body_trickling_in_is_cut_off(start_gateway, origin: Origin) -> None:
    """One byte a second never trips the stall timeout (2s here); a whole-body limit does."""
    gw = start_gateway("-read-timeout", "2s")
    for request in (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        b"POST %s/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" % origin.url.encode(),
    ):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=15) as s:
            s.sendall(request + b"{" * 1024)
            answer = b""
            for _ in range(12):  # bounded: at most 12 s of trickling
                try:
                    s.sendall(b" ")
                except OSError:
                    break
                s.settimeout(1.0)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer:
                    break
            assert answer.startswith(b"HTTP/1.1 408"), (request[:40], answer[:200])


def _non_json_lines(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            bad.append(line)
            continue
        if not (isinstance(entry, dict) and {"time", "level", "msg"} <= entry.keys()):
            bad.append(line)
    return bad


def test_json_logs_stay_json_lines_under_abuse(start_gateway, start_worker) -> None:
    """Garbage, clients leaving mid-stream and mid-upload, a worker killed under load, a
    refused origin, shutdown: with -log-format json (the default) every line the gateway
    and the worker print is a JSON object."""
    w = start_worker("--latency", "0.05", "--max-concurrency", "4")
    gw = start_gateway("--workers", "2", "-worker-addrs", w.addr, "--token-timeout", "1s", "--http-ports", "*")
    wait_healthy(gw)
    for garbage in (
        b"\x00\xff\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b'POST /v1/inference HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n{"a":',
    ):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            s.recv(4096)
    for _ in range(3):  # a client leaving after its first token
        with requests.post(
            f"{gw.proxy}/v1/inference", json={"prompt": "w " * 30, "max_tokens": 30}, stream=True, timeout=20
        ) as r:
            next(line for line in r.iter_lines() if line.startswith(b"data:"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:  # gone mid-upload to an origin
        s.sendall(b"POST http://127.0.0.1:9/x HTTP/1.1\r\nHost: x\r\nContent-Length: 9999\r\n\r\nab")
    assert raw(gw, b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 502")
    streams = [
        requests.post(f"{gw.proxy}/v1/inference", json={"prompt": "k " * 40, "max_tokens": 40}, stream=True, timeout=20)
        for _ in range(2)
    ]
    w.kill()  # mid-stream: error events, a worker ejected
    for r in streams:
        with r:
            assert b"event: error" in b"\n".join(r.iter_lines())
    gw.stop()
    assert not _non_json_lines(gw.log()), _non_json_lines(gw.log())[:10]
    assert not _non_json_lines(w.log_path.read_text()), _non_json_lines(w.log_path.read_text())[:10]
