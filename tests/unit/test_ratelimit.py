"""The leaky bucket with an injected clock, and client identity."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time

import pytest

from proxygate.config import parse_networks
from proxygate.policy.identity import ClientIdentity
from proxygate.policy.ratelimit import BucketSpec, MemoryLimiter
from proxygate.policy.ratelimit.shared import STALE_LOCK, SharedMemoryLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


STORES = {"memory": MemoryLimiter, "shared": SharedMemoryLimiter}


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> type:
    """The in-process store and the shared-memory one (several processes) obey the same tests."""
    return STORES[request.param]


def limiter(per_minute: float = 100, burst: int = 20, cls: type = MemoryLimiter, **kw: int) -> tuple:
    clock = Clock()
    return cls(BucketSpec.per_minute(per_minute, burst), clock=clock, **kw), clock


def test_burst_then_reject_with_headers(store: type) -> None:
    lim, clock = limiter(cls=store)
    decisions = [lim.check_now("a") for _ in range(21)]
    assert all(d.allowed for d in decisions[:20]) and not decisions[20].allowed
    assert decisions[0].remaining == 19 and decisions[19].remaining == 0
    rejected = decisions[20]
    # One unit drains in 60/100 s.
    assert rejected.retry_after == pytest.approx(0.6)
    assert rejected.reset_after == pytest.approx(20 * 0.6)
    headers = dict(rejected.headers())
    assert headers[b"Retry-After"] == b"1" and headers[b"X-RateLimit-Limit"] == b"20"
    assert headers[b"X-RateLimit-Remaining"] == b"0" and headers[b"X-RateLimit-Reset"] == b"12"


def test_exact_refill(store: type) -> None:
    lim, clock = limiter(cls=store)
    for _ in range(20):
        assert lim.check_now("a").allowed
    clock.now += 0.59
    assert not lim.check_now("a").allowed
    clock.now += 0.02  # 0.61 s after the burst: one unit drained
    assert lim.check_now("a").allowed
    assert not lim.check_now("a").allowed
    clock.now += 12.0  # a full drain gives back the whole burst
    assert sum(lim.check_now("a").allowed for _ in range(25)) == 20


def test_steady_rate_at_the_limit_is_all_admitted(store: type) -> None:
    lim, clock = limiter(cls=store)
    admitted = 0
    for _ in range(1000):
        clock.now += 0.6
        admitted += lim.check_now("a").allowed
    assert admitted == 1000


def test_slightly_over_the_limit_client_is_not_locked_out(store: type) -> None:
    """2 req/s against 100/min, burst 20, for 300 s: about 20 + 300*100/60 = 520 admitted.

    The seed's Redis script moved the timestamp on rejects without draining,
    admitting about 120.
    """
    lim, clock = limiter(cls=store)
    admitted = 0
    for _ in range(600):
        admitted += lim.check_now("a").allowed
        clock.now += 0.5
    assert 510 <= admitted <= 525, admitted


def test_clients_are_independent(store: type) -> None:
    lim, _ = limiter(burst=1, cls=store)
    assert lim.check_now("a").allowed and not lim.check_now("a").allowed
    assert lim.check_now("b").allowed


def test_memory_is_bounded_and_drained_buckets_forgotten() -> None:
    lim, clock = limiter(max_clients=1000)
    for i in range(50_000):
        lim.check_now(f"client-{i}")
    assert len(lim) <= 1000
    clock.now += 60  # every bucket drained (one unit drains in 0.6 s)
    lim.sweep()
    assert len(lim) == 0


def test_eviction_keeps_recently_seen_client() -> None:
    lim, clock = limiter(burst=2, max_clients=10)
    lim.check_now("busy")
    lim.check_now("busy")
    for i in range(100):
        lim.check_now(f"x{i}")
        if i % 5 == 0:
            assert not lim.check_now("busy").allowed  # still tracked: still limited


def test_async_interface(store: type) -> None:
    lim, _ = limiter(burst=1, cls=store)
    assert asyncio.run(lim.check("k")).allowed


def test_shared_table_is_bounded_and_reuses_drained_slots() -> None:
    lim, clock = limiter(cls=SharedMemoryLimiter, max_clients=1000)
    for i in range(50_000):
        assert lim.check_now(f"client-{i}").allowed  # a full table forgets the oldest, it never fails
    assert lim.tracked() <= 2048 + 16
    clock.now += 60
    assert lim.tracked() == 0


def test_shared_budget_holds_across_forked_processes() -> None:
    lim, _ = limiter(per_minute=1, burst=10, cls=SharedMemoryLimiter)
    read, write = os.pipe()
    pids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            allowed = sum(lim.check_now("one-client").allowed for _ in range(20))
            os.write(write, bytes([allowed]))
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    counts = list(os.read(read, 16))
    os.close(read)
    os.close(write)
    assert len(counts) == 3 and sum(counts) == 10, counts


def test_shared_lock_left_by_a_dead_process_is_broken() -> None:
    lim, _ = limiter(cls=SharedMemoryLimiter)
    pid = os.fork()
    if pid == 0:
        lim._lock.acquire()  # dies holding it, as a SIGKILLed process would
        os._exit(0)
    os.waitpid(pid, 0)
    start = time.monotonic()
    assert lim.check_now("a").allowed
    assert time.monotonic() - start < STALE_LOCK + 1.0
    assert lim.check_now("a").allowed  # and the lock works normally again


TRUSTED = parse_networks("10.0.0.0/8,192.168.1.1/32")


@pytest.mark.parametrize(
    "peer, headers, expected",
    [
        ("203.0.113.5", [(b"X-Forwarded-For", b"1.2.3.4")], "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.2", [(b"X-Forwarded-For", b"1.2.3.4")], "1.2.3.4"),
        ("10.0.0.2", [(b"X-Forwarded-For", b"6.6.6.6, 1.2.3.4, 10.9.9.9")], "1.2.3.4"),  # right-most untrusted
        ("10.0.0.2", [(b"X-Forwarded-For", b"6.6.6.6"), (b"X-Forwarded-For", b"1.2.3.4")], "1.2.3.4"),
        ("10.0.0.2", [(b"X-Real-IP", b"5.6.7.8")], "5.6.7.8"),
        ("10.0.0.2", [(b"X-Forwarded-For", b"garbage, 10.1.1.1")], "10.1.1.1"),
        ("10.0.0.2", [], "10.0.0.2"),
        ("10.0.0.2", [(b"X-Forwarded-For", b"[2001:db8::1]:443")], "2001:db8::1"),
        ("192.168.1.1", [(b"X-Forwarded-For", b"1.2.3.4:5555")], "1.2.3.4"),
    ],
)
def test_client_identity(peer: str, headers: list, expected: str) -> None:
    assert ClientIdentity(TRUSTED).client_ip(peer, headers) == expected


def test_no_trusted_proxies_means_peer_only() -> None:
    assert ClientIdentity().client_ip("9.9.9.9", [(b"X-Forwarded-For", b"1.1.1.1")]) == "9.9.9.9"


def test_ipv6_prefix_key() -> None:
    ident = ClientIdentity(ipv6_prefix=64)
    assert ident.key("2001:db8:1:2:aaaa::1", []) == "2001:db8:1:2::/64"
    assert ident.key("2001:db8:1:2:bbbb::9", []) == "2001:db8:1:2::/64"
    assert ident.key("1.2.3.4", []) == "1.2.3.4"
    assert ipaddress.ip_address(ClientIdentity().key("2001:db8::1", []))


def test_an_admitted_requests_header_lines_are_those_of_its_decision() -> None:
    """`BucketSpec.head_lines` (the in-process stores' path, no Decision made) renders what
    `decision(True, level).head_lines()` does, at every level a bucket can hold."""
    spec = BucketSpec.per_minute(100, 20)
    for level in [0.0, 1e-12, 0.3, 1.0, 1.5, 7.999999, 19.0, 19.9999999999, 20.0, 20.5]:
        assert spec.head_lines(level) == spec.decision(True, level).head_lines(), level
    lines = spec.head_lines(1.5).decode()
    assert lines == "X-RateLimit-Limit: 20\r\nX-RateLimit-Remaining: 18\r\nX-RateLimit-Reset: 1\r\n"
