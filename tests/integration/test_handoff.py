"""`--workers 2`: a connection with an inference request moves to the inference plane's owner.

The kernel spreads connections over both processes; the one that does not
own the inference plane passes the socket itself to the owner (with the
bytes it already read) instead of relaying every token; while the owner
holds fewer than `--spread-above` connections (and is not busy), it moves
new connections at once, before reading them, and a load of short
connections the kernel gives to the owner directly (`steering.py`). Each
test sends enough connections that both processes take some, and reads
`inference_handoffs_total` to see which way they went.
Plain proxy connections gather in the owner at their second request while
it holds fewer than `--spread-above` (`proxy_connections_gathered_total`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time

import requests

from tests.support.gateway import GatewayProcess, RawResponses
from tests.support.inference import wait_healthy
from tests.support.origin import Origin
from tests.support.waiting import metric, wait_for

BODY = json.dumps({"prompt": "one two three", "max_tokens": 4}).encode()


def _post(path: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path,
        extra,
        len(body),
        body,
    )


def test_a_moved_connection_keeps_serving_and_a_split_body_arrives_whole(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "4")
    gw = start_gateway("--workers", "2", "-worker-addrs", w.addr)
    wait_healthy(gw)
    for i in range(12):
        with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
            request = _post(
                b"/v1/completions", json.dumps({"model": "m", "prompt": f"p{i} x", "max_tokens": 3}).encode()
            )
            cut = len(request) - 10
            s.sendall(request[:cut])
            time.sleep(0.01)  # the body's end comes later: whoever reads it, the request is whole
            s.sendall(request[cut:])
            reader = RawResponses(s)
            status, headers, body = reader.next()
            assert status == 200 and json.loads(body)["choices"][0]["text"].startswith("[m]"), body
            # The same connection, now in whichever process has it: an inference request, then a proxy one.
            s.sendall(_post(b"/v1/inference", BODY) + b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            status, headers, body = reader.next()
            assert status == 200 and b'"finished":true' in body
            status, headers, body = reader.next()
            assert status == 200 and body == b'{"status":"ok"}\n'
    wait_for(lambda: metric(gw, "inference_handoffs_total", result="moved") > 0, "connections handed over")
    assert metric(gw, "inference_handoffs_total", result="relayed") == 0
    # Each request counted once, by the process that answered it (counted twice, it would read 48).
    assert metric(gw, "proxy_requests_total", method="POST", status="200") == 24
    assert w.health().generations_started == 24


def _keep_owner_busy(port: int) -> socket.socket:
    """A kept-alive connection that lives in the inference plane's owner: with `--spread-above 1`
    the owner then has no room at accept, so new connections stay where the kernel put them."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")  # served by the owner, wherever it lands
    status, _, _ = RawResponses(s).next()
    assert status == 200
    return s


def _served_by(port: int) -> str:
    """Which process answered a request on a new connection: its request ids' prefix."""
    r = requests.get(f"http://127.0.0.1:{port}/healthz", headers={"Connection": "close"}, timeout=10)
    assert r.status_code == 200
    return r.headers["X-Request-ID"][:10]


def test_an_owner_with_room_takes_new_connections_at_accept(start_gateway) -> None:
    """While the owner has fewer than `--spread-above` connections and is not busy, the other
    process moves each new one before reading it, from the first connection after start (it
    connects to the owner before it serves).

    The connections stay open, as a browser's or a pool's do: a load of
    short connections is steered by the kernel instead (the next test).
    Only /healthz is asked here, which never moves a connection for its
    request: every connection counted as moved moved at accept.
    """
    gw = start_gateway("--workers", "2")
    held = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(20)]
    try:
        answered = []
        for s in held:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
            status, headers, _ = RawResponses(s).next()
            assert status == 200
            answered.append(headers["x-request-id"][:10])
        with _keep_owner_busy(gw.port) as owner_connection:
            owner = _owner_prefix(owner_connection)
    finally:
        for s in held:
            s.close()
    assert answered == [owner] * 20
    assert metric(gw, "inference_handoffs_total", result="moved") > 0, "the kernel gave the other process none"


def test_a_load_of_short_connections_is_steered_to_the_owner(start_gateway) -> None:
    """A new connection per request, the owner not busy: once its busy meter has seen such a
    load (it ticks every 0.1 s), the owner has the kernel give it every new connection
    (`steering.py`), so none reaches the other process, and none moves."""
    gw = start_gateway("--workers", "2")
    with _keep_owner_busy(gw.port) as owner_connection:
        owner = _owner_prefix(owner_connection)

    def steered() -> bool:
        moved = metric(gw, "inference_handoffs_total", result="moved")
        answered = [_served_by(gw.port) for _ in range(20)]
        assert answered == [owner] * 20, "moved at accept, or steered: the owner answers either way"
        return metric(gw, "inference_handoffs_total", result="moved") == moved

    wait_for(steered, "20 new connections in a row that the other process never saw")


def test_an_owner_without_room_is_left_alone(start_gateway) -> None:
    gw = start_gateway("--workers", "2", "--spread-above", "1")
    with _keep_owner_busy(gw.port):
        answered = {_served_by(gw.port) for _ in range(40)}
    assert len(answered) == 2, "both processes serve the connections the kernel gives them"


def test_what_cannot_move_is_relayed(start_gateway, start_worker) -> None:
    w = start_worker("--max-concurrency", "4")
    gw = start_gateway("--workers", "2", "--spread-above", "1", "-worker-addrs", w.addr)
    with _keep_owner_busy(gw.port):
        # Only now: polls made while the owner had room could move at accept (on a busy
        # machine it takes more of them), and only the busy connection may have moved.
        wait_healthy(gw)
        for _ in range(12):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
                # A chunked body: its raw bytes are gone once decoded, so the request is relayed.
                s.sendall(
                    b"POST /v1/inference HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
                )
                status, _, body = RawResponses(s).next()
                assert status == 200 and b'"finished":true' in body
        wait_for(lambda: metric(gw, "inference_handoffs_total", result="relayed") > 0, "relayed requests")
        assert metric(gw, "inference_handoffs_total", result="moved") <= 1  # at most the busy connection


def test_tls_connections_are_relayed(start_gateway, start_worker, server_cert_files, ca_file) -> None:
    """A TLS session's state cannot move with its socket: its requests are relayed."""
    w = start_worker("--max-concurrency", "4")
    pem, key = server_cert_files
    gw = start_gateway("--workers", "2", "-worker-addrs", w.addr, "-proto", "https", "-pem", pem, "-key", key)
    url = f"https://127.0.0.1:{gw.port}"

    def handoffs(result: str) -> float:
        text = requests.get(f"{url}/metrics", verify=ca_file, timeout=5).text
        found = re.search(rf'^inference_handoffs_total{{result="{result}"}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    wait_for(
        lambda: requests.get(f"{url}/status.json", verify=ca_file, timeout=5).json()["workers"][0]["healthy"],
        "a healthy worker",
    )
    for _ in range(12):
        r = requests.post(f"{url}/v1/inference", data=BODY, verify=ca_file, headers={"Connection": "close"}, timeout=30)
        assert r.status_code == 200 and '"finished":true' in r.text
    wait_for(lambda: handoffs("relayed") > 0, "relayed TLS requests")
    assert handoffs("moved") == 0


def _get(origin: Origin) -> bytes:
    return b"GET %s/hello HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (origin.url.encode(), origin.port)


def _owner_prefix(busy: socket.socket) -> str:
    """The request-id prefix of the owner, from the connection `_keep_owner_busy` made."""
    busy.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    status, headers, _ = RawResponses(busy).next()
    assert status == 200
    return headers["x-request-id"][:10]


def _kept_by_the_other_process(gw: GatewayProcess, origin: Origin, owner: str) -> tuple[socket.socket, RawResponses]:
    """A kept-alive proxy connection whose first request the other process answered."""
    for _ in range(200):  # the kernel picks the process; 200 misses in a row are 2**-200
        s = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        reader = RawResponses(s)
        s.sendall(_get(origin))
        status, headers, _ = reader.next()
        assert status == 200
        if headers["x-request-id"][:10] != owner:
            return s, reader
        s.close()
    raise AssertionError("no connection reached the second process")


def test_light_load_gathers_in_one_process(start_gateway, origin) -> None:
    """A kept-alive proxy connection that stayed in the other process at accept (the owner
    held `--spread-above` connections) moves to the owner at its second request while the owner
    uses under half a core: one process serves light load. The request moves with the part of
    its body that had arrived; the rest follows."""
    gw = start_gateway("--workers", "2", "--spread-above", "1")
    body = bytes(range(256)) * 64
    post = b"POST %s/upload HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: %d\r\n\r\n" % (
        origin.url.encode(),
        origin.port,
        len(body),
    )
    with _keep_owner_busy(gw.port) as busy:
        owner = _owner_prefix(busy)
        s, reader = _kept_by_the_other_process(gw, origin, owner)
        with s:
            s.sendall(post + body[:1000])
            time.sleep(0.01)  # the rest comes later: whichever process reads it, the body is whole
            s.sendall(body[1000:])
            status, headers, answer = reader.next()
            assert status == 200 and headers["x-request-id"][:10] == owner
            assert json.loads(answer) == {"length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
            s.sendall(_get(origin))  # and the connection stays with the owner
            status, headers, _ = reader.next()
            assert status == 200 and headers["x-request-id"][:10] == owner
    # Exactly one: the connections the owner took stayed. Whichever process answers
    # /metrics, it asks the other for its counts first.
    assert metric(gw, "proxy_connections_gathered_total") == 1


def test_spread_above_zero_keeps_the_kernels_spread(start_gateway, origin) -> None:
    gw = start_gateway("--workers", "2", "--spread-above", "0")
    with _keep_owner_busy(gw.port) as busy:
        owner = _owner_prefix(busy)
        s, reader = _kept_by_the_other_process(gw, origin, owner)
        with s:
            s.sendall(_get(origin))
            status, headers, _ = reader.next()
    assert status == 200 and headers["x-request-id"][:10] != owner, "the connection stayed where the kernel put it"
    assert metric(gw, "proxy_connections_gathered_total") == 0


def test_a_burst_of_connections_is_spread_then_gathered_while_the_owner_has_room(start_gateway, origin) -> None:
    """64 connections at once, as a load generator opens them: they move at accept only until
    the owner holds `--spread-above` (8 here), so the first requests are served by both
    processes (the other one passes at most 8 of the 20 to 44 the kernel gives it), and at the
    second requests the owner, using far less than half a core, takes them all. (That a move
    at accept is counted at once is a unit test: test_handoff_pieces.py.)"""
    gw = start_gateway("--workers", "2", "--spread-above", "8")
    socks = [socket.create_connection(("127.0.0.1", gw.port), timeout=10) for _ in range(64)]
    try:
        readers = [RawResponses(s) for s in socks]
        served: list[set[str]] = []
        for _ in range(2):  # the second request is where a kept-alive connection may move
            for s in socks:
                s.sendall(_get(origin))
            served.append(set())
            for reader in readers:
                status, headers, _ = reader.next()
                assert status == 200
                served[-1].add(headers["x-request-id"][:10])
    finally:
        for s in socks:
            s.close()
    assert [len(processes) for processes in served] == [2, 1], "spread by the kernel, then gathered in one process"
