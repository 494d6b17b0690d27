"""A mutation fuzzer for the HTTP front end and the JSON APIs.

Seeds are valid requests of every kind the gateway takes (absolute-form
proxy requests with and without bodies, chunked uploads, CONNECT, its own
endpoints, the three inference APIs). Each request sent is a seed mutated
at the byte level (flips, inserts of framing tokens, deletions, truncation,
splices, duplicated or injected headers) or, for the JSON APIs, at the
value level (every field set to a hostile value: lone surrogates, huge and
negative numbers, wrong types, deep nesting, long strings), re-framed with a
correct Content-Length so it reaches the JSON layer. Every request goes on
a new connection that is half-closed after sending, so an incomplete
request ends at once instead of waiting for a timeout.

Failures: the gateway process dying, a 500 ("internal error": an exception
escaped a handler), a handler traceback in the log, or /healthz not
answering at the end, and any other 5xx: 502/504 are expected only where a
mutation changed the destination (nothing answers there) and are counted
apart, as is 501 (a transfer coding the gateway does not implement).
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import requests as http

from tests.support.gateway import OPEN_POLICY
from tests.support.origin import Origin

from .harness import GatewayProcess, Report, WorkerProcess, exchange, status_of, wait_until

INTERESTING = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b":",
    b"\t",
    b"\x7f",
    b"\xff",
    b"%00",
    b"%",
    b"@",
    b"#",
    b"?",
    b"chunked",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"CONNECT ",
    b"http://",
    b"[::1]",
    b"0\r\n\r\n",
    b"ffffffffffffffff\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"Expect: 100-continue\r\n",
    b"Upgrade: websocket\r\n",
    b"Host: \r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Connection: close\r\n",
    b"\xc3\x28",
    b"\xed\xa0\x80",
]
HOSTILE: list[Any] = [
    None,
    True,
    False,
    -1,
    0,
    2**31,
    2**63,
    -(2**63) - 1,
    2**200,
    1e308,
    -0.0,
    "",
    "\ud800",
    "a\udfffb",
    "\x00",
    "x" * 100_000,
    "é" * 1000,
    [],
    {},
    [1, "two", None],
    {"role": 1},
    {"a": {"b": {}}},
    "NaN",
    float("inf"),
]


UNREACHABLE = re.compile(rb"\r\n\r\n(cannot resolve|connection refused by|cannot connect to|timed out connecting to)")


def aimed_at(request: bytes, origin_port: int) -> bool:
    """Whether the request line still names the origin (a mutation may have changed its host or port)."""
    parts = request.split(b"\r\n", 1)[0].split(b" ")
    return len(parts) > 1 and parts[1].split(b"/")[2 if b"://" in parts[1] else 0] == b"127.0.0.1:%d" % origin_port


def seeds(origin_port: int) -> list[bytes]:
    o = f"127.0.0.1:{origin_port}".encode()
    body = b'{"k":"v"}'
    return [
        b"GET http://%s/data/1024 HTTP/1.1\r\nHost: %s\r\nUser-Agent: fuzz\r\n\r\n" % (o, o),
        b"POST http://%s/echo HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n%s" % (o, o, len(body), body),
        b"POST http://%s/echo HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
        % (o, o),
        b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\nhello" % (o, o),
        b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\nGET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"HEAD http://%s/ HTTP/1.0\r\n\r\n" % o,
        b"GET /status.json HTTP/1.1\r\nHost: gw\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n",
    ]


API_SEEDS: list[tuple[str, dict[str, Any]]] = [
    ("/v1/inference", {"prompt": "hello there", "max_tokens": 4, "temperature": 0, "priority": 5}),
    ("/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True, "stop": ["x"], "seed": 1}),
    (
        "/v1/chat/completions",
        {
            "model": "m",
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "top_p": 0.9,
            "temperature": 0.5,
        },
    ),
]


def mutate_bytes(data: bytes, rng: random.Random, pool: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(b) + 1)
        op = rng.randrange(9)
        if op == 0 and b:
            b[pos % len(b)] = rng.randrange(256)
        elif op == 1:
            b[pos:pos] = rng.choice(INTERESTING)
        elif op == 2:
            del b[pos : pos + rng.randint(1, 16)]
        elif op == 3:  # duplicate one line
            lines = bytes(b).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            b = bytearray(b"\r\n".join(lines))
        elif op == 4:
            b = bytearray(bytes(b).replace(b"\r\n", b"\n", rng.randint(1, 3)))
        elif op == 5:
            b[pos:pos] = bytes([rng.randrange(256)]) * rng.choice([100, 9000, 70_000])
        elif op == 6:
            del b[pos:]
        elif op == 7:
            b[pos:pos] = rng.choice(pool)
        else:  # a number changed to an extreme
            digits = [i for i, c in enumerate(b) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                b[i : i + 1] = rng.choice([b"0", b"-1", b"99999999999999999999", b"00000000000001", b"1e3", b"0x10"])
    return bytes(b)


def mutate_json(body: dict[str, Any], rng: random.Random) -> bytes:
    doc = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 3)):
        if not isinstance(doc, dict):
            break  # replaced by a whole hostile value: nothing left to edit
        op = rng.randrange(6)
        if op == 0:  # a top-level field set to a hostile value
            doc[rng.choice(list(doc) or ["prompt"])] = rng.choice(HOSTILE)
        elif op == 1 and isinstance(doc.get("messages"), list) and doc["messages"]:
            msg = rng.choice(doc["messages"])
            if isinstance(msg, dict):
                msg[rng.choice(["role", "content", "name"])] = rng.choice(HOSTILE)
        elif op == 2 and doc:
            doc.pop(rng.choice(list(doc)))
        elif op == 3:
            doc[rng.choice(["n", "logprobs", "tools", "extra", "stream_options", "user"])] = rng.choice(HOSTILE)
        elif op == 4:
            doc = rng.choice(HOSTILE + [[doc]])
        else:
            depth = rng.choice([100, 5000, 100_000])
            doc = {"prompt": "x", "max_tokens": 1, "nested": None}
            text = json.dumps(doc).replace("null", "[" * depth + "]" * depth)
            return text.encode()
    try:
        text = json.dumps(doc, ensure_ascii=rng.random() < 0.5)
    except ValueError:
        text = "{}"
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        data = mutate_bytes(data, rng, [b"\xff", b"\x00"])
    return data


def api_request(path: str, body: bytes, rng: random.Random) -> bytes:
    extra = rng.choice([b"", b"X-Priority: 10\r\n", b"X-Priority: -5\r\n", b"Authorization: Bearer x\r\n"])
    return b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        extra,
        len(body),
        body,
    )


def run_fuzz(work: Path, report: Report, *, requests: int, seconds: float, threads: int = 6, seed: int = 1) -> None:
    with Origin() as origin:
        worker = WorkerProcess(["--engine", "echo", "--max-concurrency", "16"], work / "fuzz-worker.log")
        gw = GatewayProcess(
            [*OPEN_POLICY, "--http-ports", "*", "-worker-addrs", worker.addr, "--read-timeout", "2s"],
            work / "fuzz-gateway.log",
        )
        try:
            # The worker healthy first: until the gateway has seen it so, an inference request is
            # rightly answered 503 (no worker), which would count against the gateway here.
            healthy = wait_until(
                lambda: http.get(f"{gw.proxy}/status.json", timeout=5).json()["workers"][0]["healthy"], 20
            )
            if not healthy:
                report.add("fuzz: HTTP front end and JSON APIs", False, "the worker never became healthy")
                return
            _fuzz(gw, origin.port, report, requests=requests, seconds=seconds, threads=threads, seed=seed)
        finally:
            gw.stop()
            worker.stop()


def _fuzz(
    gw: GatewayProcess, origin_port: int, report: Report, *, requests: int, seconds: float, threads: int, seed: int
) -> None:
    pool = seeds(origin_port)
    counts: Counter[int] = Counter()
    examples: list[tuple[bytes, bytes]] = []  # the first few 5xx: what was sent, what came back
    lock = threading.Lock()
    sent = 0
    deadline = time.monotonic() + seconds

    def one(rng: random.Random) -> bytes:
        if rng.random() < 0.4:
            path, body = rng.choice(API_SEEDS)
            return api_request(path, mutate_json(body, rng), rng)
        return mutate_bytes(rng.choice(pool), rng, pool)

    def loop(index: int) -> None:
        nonlocal sent
        rng = random.Random(seed * 1000 + index)
        local: Counter[int] = Counter()
        while time.monotonic() < deadline:
            with lock:
                if sent >= requests:
                    break
                sent += 1
            request = one(rng)
            try:
                answer = exchange(gw.port, request, timeout=5.0)
            except OSError:
                answer = b""
            code = status_of(answer)
            if code == 500 or b"internal error" in answer:
                code = 500
            if code in (502, 504) and (UNREACHABLE.search(answer) or not aimed_at(request, origin_port)):
                code = -1  # the mutation named a host or port nothing answers on: a true 502
            local[code] += 1
            if code >= 500 and code != 501 and len(examples) < 12:
                examples.append((request[:300], answer[:300]))
        with lock:
            counts.update(local)

    started = time.monotonic()
    workers: list[threading.Thread] = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    elapsed = time.monotonic() - started
    alive = gw.proc.poll() is None
    healthy = alive and status_of(exchange(gw.port, b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")) == 200
    tracebacks = gw.log().count("Traceback")
    total = sum(counts.values())
    # 501 is RFC 9112's answer to a transfer coding we do not implement: expected, not a fault.
    blamed = sum(n for code, n in counts.items() if code >= 500 and code != 501)
    names = {0: "no answer", -1: "502 unreachable destination"}
    by_class = ", ".join(f"{names.get(code, code)}: {n:,}" for code, n in sorted(counts.items()))
    report.add(
        "fuzz: HTTP front end and JSON APIs",
        alive and healthy and blamed == 0 and tracebacks == 0 and total >= min(requests, 1),
        f"{total:,} mutated requests in {elapsed:.0f} s ({total / elapsed:,.0f}/s); crashes: {0 if alive else 1}; "
        f"5xx answers to client bytes: {blamed}; tracebacks in the log: {tracebacks}; "
        f"/healthz after: {'200' if healthy else 'FAILED'}; answers: {by_class}",
    )
    if examples:  # listed after the table too, so a failing test's message shows them
        report.detail("fuzz 5xx examples", [f"sent {sent!r}, got {answer!r}" for sent, answer in examples])
