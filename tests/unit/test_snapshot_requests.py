"""A scrape asks the other serving processes to publish first (real unix sockets, one event loop)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from proxygate.observability.metrics_exchange import MetricsExchange, merge
from proxygate.observability.snapshot_requests import SnapshotRequests


def counted(families: list, name: str) -> float:
    return sum(s[2] for fam in merge([families]) for s in fam["samples"] if s[0] == name)


def test_a_scrape_sees_what_another_process_counted_since_its_last_publish(tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        registry = CollectorRegistry()
        refused = Counter("refused", "refused requests", registry=registry)
        other = MetricsExchange(tmp_path, 1)
        other.publish(registry)
        other.requests.start(loop, lambda: other.publish(registry))
        refused.inc(3)  # counted after its last publish
        scraper = MetricsExchange(tmp_path, 0)
        scraper.requests.start(loop, lambda: None)
        assert counted(scraper.merged_with_errors(CollectorRegistry(), ())[0], "refused_total") == 0
        assert await scraper.requests.refresh() == 1
        assert counted(scraper.merged_with_errors(CollectorRegistry(), ())[0], "refused_total") == 3
        other.requests.close()
        scraper.requests.close()

    asyncio.run(main())


def test_a_process_that_is_gone_costs_no_wait(tmp_path: Path) -> None:
    # Its socket file is left behind with nobody reading it: the send is refused at once.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(tmp_path / "ask-1.sock"))
    dead.close()

    async def main() -> None:
        scraper = SnapshotRequests(tmp_path, 0, timeout=3600)
        scraper.start(asyncio.get_running_loop(), lambda: None)
        assert await asyncio.wait_for(scraper.refresh(), 30) == 0
        scraper.close()

    asyncio.run(main())


def test_a_process_that_does_not_answer_is_waited_for_only_until_the_timeout(tmp_path: Path) -> None:
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # bound, never read: a blocked process
    stuck.bind(str(tmp_path / "ask-1.sock"))

    async def main() -> None:
        scraper = SnapshotRequests(tmp_path, 0, timeout=0.05)
        scraper.start(asyncio.get_running_loop(), lambda: None)
        assert await scraper.refresh() == 0
        assert not scraper._waiting
        scraper.close()

    try:
        asyncio.run(main())
        assert stuck.recv(64)[:1] == b"?"  # it was asked
    finally:
        stuck.close()


def test_requests_read_together_share_one_publish_and_each_is_answered(tmp_path: Path) -> None:
    publishes = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        other = SnapshotRequests(tmp_path, 2)
        other.start(loop, lambda: publishes.append(1))
        first, second = SnapshotRequests(tmp_path, 0), SnapshotRequests(tmp_path, 1)
        first.start(loop, lambda: None)
        second.start(loop, lambda: None)
        # Each asks both others; `other` reads both requests in one pass.
        answered = await asyncio.gather(first.refresh(), second.refresh())
        assert answered == [2, 2]
        for each in (other, first, second):
            each.close()

    asyncio.run(main())
    assert len(publishes) == 1


def test_a_publish_that_fails_leaves_the_asker_to_its_timeout(tmp_path: Path) -> None:
    def full_disk() -> None:
        raise OSError(28, "No space left on device")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        other = SnapshotRequests(tmp_path, 1)
        other.start(loop, full_disk)
        scraper = SnapshotRequests(tmp_path, 0, timeout=0.05)
        scraper.start(loop, lambda: None)
        assert await scraper.refresh() == 0
        other.close()
        scraper.close()

    asyncio.run(main())
