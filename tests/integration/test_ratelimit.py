"""Rate limiting through the real gateway, with a real redis-server."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time

import pytest
import redis.asyncio
import requests

from proxygate.policy.ratelimit import BucketSpec, MemoryLimiter, RedisLimiter
from tests.support.gateway import GatewayProcess, RawResponses
from tests.support.origin import EchoTcpServer, Origin
from tests.support.redis_server import RedisServer


def make_limiter(kind: str, spec: BucketSpec, redis_server: RedisServer | None):
    if kind == "memory":
        return MemoryLimiter(spec)
    assert redis_server is not None
    return RedisLimiter(spec, redis_server.addr)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest):
    """(kind, redis server or None): the same suite runs against both stores."""
    if request.param == "redis":
        return "redis", request.getfixturevalue("redis_server")
    return "memory", None


def test_store_burst_retry_and_refill(store) -> None:
    kind, server = store

    async def run() -> None:
        lim = make_limiter(kind, BucketSpec.per_minute(600, 5), server)  # 10/s, burst 5
        try:
            results = [await lim.check("k") for _ in range(6)]
            assert [d.allowed for d in results] == [True] * 5 + [False]
            assert [d.remaining for d in results[:5]] == [4, 3, 2, 1, 0]
            assert 0.0 < results[5].retry_after <= 0.11
            await asyncio.sleep(results[5].retry_after + 0.02)
            assert (await lim.check("k")).allowed
            assert not (await lim.check("k")).allowed
            assert (await lim.check("other")).allowed
        finally:
            await lim.aclose()

    asyncio.run(run())


def test_store_charges_any_bucket_and_forced_charges_settle(store) -> None:
    """Budgets use `charge`: any bucket shape and cost; a forced charge always applies, a negative one gives back."""
    kind, server = store

    async def run() -> None:
        lim = make_limiter(kind, BucketSpec.per_minute(60, 1), server)
        tokens = BucketSpec(capacity=600, rate=0.001)  # barely drains during the test
        try:
            assert await lim.charge("b:t:k", tokens, 500, False) == (True, pytest.approx(500, abs=0.01))
            allowed, level = await lim.charge("b:t:k", tokens, 200, False)
            assert not allowed and level == pytest.approx(500, abs=0.01)  # refused, nothing added
            allowed, level = await lim.charge("b:t:k", tokens, -450, True)  # settled: 50 of 500 used
            assert allowed and level == pytest.approx(50, abs=0.01)
            assert (await lim.charge("b:t:k", tokens, 500, False))[0]
            allowed, level = await lim.charge("b:t:k", tokens, 100, True)  # more than reserved: charged anyway
            assert allowed and level == pytest.approx(650, abs=0.01)
            assert (await lim.charge("b:t:k", tokens, -10_000, True))[1] == 0  # never below empty
        finally:
            await lim.aclose()

    asyncio.run(run())


def test_store_slightly_over_limit_client(store) -> None:
    """20 req/s against 10/s with burst 5 for 3 s: about 5 + 30 admitted, not a lock-out."""
    kind, server = store

    async def run() -> tuple[int, float]:
        lim = make_limiter(kind, BucketSpec.per_minute(600, 5), server)
        admitted = 0
        start = time.monotonic()
        try:
            for i in range(60):
                await asyncio.sleep(max(0.0, start + i * 0.05 - time.monotonic()))
                admitted += (await lim.check("k")).allowed
        finally:
            await lim.aclose()
        return admitted, time.monotonic() - start

    admitted, elapsed = asyncio.run(run())
    # The burst plus what drained meanwhile (measured, so a slow machine does not fail it);
    # the seed's lock-out would admit about the burst alone.
    expected = 5 + elapsed * 10
    assert expected - 4 <= admitted <= expected + 2, (admitted, elapsed)


def test_redis_keys_expire_and_use_a_hash_tag(redis_server: RedisServer) -> None:
    async def run() -> list:
        # Checked with an independent client (redis-py), not our own.
        lim = RedisLimiter(BucketSpec.per_minute(6000, 5), redis_server.addr)
        other = redis.asyncio.Redis(host="127.0.0.1", port=redis_server.port)
        try:
            await lim.check("198.51.100.7")
            keys = await other.keys("*")
            ttl = await other.pttl(keys[0])
            return [keys, ttl]
        finally:
            await lim.aclose()
            await other.aclose()

    keys, ttl = asyncio.run(run())
    assert keys == [b"pg:rl:{198.51.100.7}"]
    assert 0 < ttl <= 1100


def limited_gateway(start_gateway, *extra: str) -> GatewayProcess:
    return start_gateway("-rate-limit", "60", "-rate-burst", "3", *extra)


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_http_burst_then_429_with_headers(kind: str, start_gateway, origin: Origin, request) -> None:
    extra = (
        ("-limiter", "redis", "-redis-addr", request.getfixturevalue("redis_server").addr) if kind == "redis" else ()
    )
    gw = limited_gateway(start_gateway, *extra)
    proxies = {"http": gw.proxy}
    ok = [requests.get(f"{origin.url}/hello", proxies=proxies, timeout=10) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Remaining"] for r in ok] == ["2", "1", "0"]
    assert all(r.headers["X-RateLimit-Limit"] == "3" for r in ok)
    limited = requests.get(f"{origin.url}/hello", proxies=proxies, timeout=10)
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "1"
    assert limited.headers["X-RateLimit-Remaining"] == "0" and int(limited.headers["X-RateLimit-Reset"]) >= 2
    # CONNECT is refused before any tunnel is opened.
    sock = gw.connect()
    sock.sendall(b"CONNECT 127.0.0.1:9 HTTP/1.1\r\n\r\n")
    status, headers, _ = RawResponses(sock).next()
    sock.close()
    assert status == 429 and "retry-after" in headers
    # Health and metrics stay reachable; the counter uses bounded labels.
    metrics = requests.get(f"{gw.proxy}/metrics", timeout=10).text
    assert 'rate_limited_requests_total{endpoint="proxy"} 1.0' in metrics
    assert 'rate_limited_requests_total{endpoint="connect"} 1.0' in metrics
    # After one unit drains (1 s at 60/min) one more request fits.
    time.sleep(1.05)
    assert requests.get(f"{origin.url}/hello", proxies=proxies, timeout=10).status_code == 200


def test_connect_allowed_carries_headers(start_gateway, echo_server: EchoTcpServer) -> None:
    gw = limited_gateway(start_gateway)
    sock = gw.connect()
    sock.sendall(f"CONNECT 127.0.0.1:{echo_server.port} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    sock.close()
    assert head.startswith(b"HTTP/1.1 200") and b"X-RateLimit-Remaining: 2" in head


def test_health_exempt_unless_included(start_gateway) -> None:
    gw = limited_gateway(start_gateway)
    assert all(requests.get(f"{gw.proxy}/healthz", timeout=5).status_code == 200 for _ in range(8))
    strict = limited_gateway(start_gateway, "--rate-limit-health")
    codes = [requests.get(f"{strict.proxy}/healthz", timeout=5).status_code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]


def test_spoofed_forwarded_for_gets_no_fresh_budget(start_gateway, origin: Origin) -> None:
    gw = limited_gateway(start_gateway)
    codes = [
        requests.get(
            f"{origin.url}/hello",
            proxies={"http": gw.proxy},
            headers={"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"198.51.100.{i}"},
            timeout=10,
        ).status_code
        for i in range(6)
    ]
    assert codes == [200, 200, 200, 429, 429, 429]


def test_trusted_proxy_forwarded_for_is_the_client(start_gateway, origin: Origin) -> None:
    gw = limited_gateway(start_gateway, "--trusted-proxies", "127.0.0.0/8")
    for client in ("203.0.113.1", "203.0.113.2"):
        codes = [
            requests.get(
                f"{origin.url}/hello",
                proxies={"http": gw.proxy},
                headers={"X-Forwarded-For": f"{client}, 127.0.0.5"},
                timeout=10,
            ).status_code
            for _ in range(4)
        ]
        assert codes == [200, 200, 200, 429], client


def test_two_gateways_share_one_budget(start_gateway, origin: Origin, redis_server: RedisServer) -> None:
    flags = ("-limiter", "redis", "-redis-addr", redis_server.addr)
    a = start_gateway("-rate-limit", "6", "-rate-burst", "4", *flags)
    b = start_gateway("-rate-limit", "6", "-rate-burst", "4", *flags)
    codes = []
    for gw in (a, b, a, b, a, b):
        codes.append(requests.get(f"{origin.url}/hello", proxies={"http": gw.proxy}, timeout=10).status_code)
    assert codes == [200, 200, 200, 200, 429, 429]


def test_redis_outage_fails_open_then_recovers(start_gateway, origin: Origin, redis_server: RedisServer) -> None:
    gw = start_gateway("-rate-limit", "60", "-rate-burst", "2", "-limiter", "redis", "-redis-addr", redis_server.addr)
    proxies = {"http": gw.proxy}
    get = lambda: requests.get(f"{origin.url}/hello", proxies=proxies, timeout=10).status_code  # noqa: E731
    assert [get(), get(), get()] == [200, 200, 429]
    redis_server.stop()
    assert [get() for _ in range(5)] == [200] * 5  # fail open
    metrics = requests.get(f"{gw.proxy}/metrics", timeout=10).text
    errors = float(re.search(r"^rate_limiter_errors_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
    assert errors >= 5
    assert gw.log().count("rate limiter store unavailable") == 1  # once per outage, not per request
    redis_server.start()
    deadline = time.monotonic() + 10
    codes = []
    while time.monotonic() < deadline:
        codes.append(get())
        if codes[-2:] == [429, 429]:
            break
    assert codes[-2:] == [429, 429], codes  # limiting resumed (fresh Redis: burst, then 429)
    gw.wait_log("rate limiter store recovered")


def test_redis_outage_fails_closed_when_asked(start_gateway, origin: Origin, redis_server: RedisServer) -> None:
    gw = start_gateway("-limiter", "redis", "-redis-addr", redis_server.addr, "--rate-limit-on-error", "closed")
    redis_server.stop()
    r = requests.get(f"{origin.url}/hello", proxies={"http": gw.proxy}, timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"


def test_unreachable_redis_at_start_exits_1(tmp_path) -> None:
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "proxygate",
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "-limiter",
            "redis",
            "-redis-addr",
            f"127.0.0.1:{port}",
            "--blocklist",
            str(tmp_path / "none.json"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert f"cannot reach Redis at 127.0.0.1:{port}" in out.stderr
