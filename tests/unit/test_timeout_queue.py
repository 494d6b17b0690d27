"""Deadlines of one length on one loop timer (`timeout_queue.py`), on a virtual clock."""

from __future__ import annotations

import asyncio

from proxygate.timeout_queue import TimeoutQueue
from tests.support.protocol import VirtualClock, run


def test_deadlines_fall_due_in_order_at_their_own_time_and_cancelled_ones_never() -> None:
    async def test(clock: VirtualClock) -> None:
        queue = TimeoutQueue(asyncio.get_running_loop(), 5.0)
        fired: list[tuple[str, float]] = []
        start = clock.now
        a = queue.start(lambda: fired.append(("a", clock.now - start)))
        await asyncio.sleep(1.0)
        b = queue.start(lambda: fired.append(("b", clock.now - start)))
        await asyncio.sleep(1.0)
        c = queue.start(lambda: fired.append(("c", clock.now - start)))
        a.cancel()  # ended early: the oldest, so the timer waits on for b
        await asyncio.sleep(10.0)
        assert fired == [("b", 6.0), ("c", 7.0)]
        assert (a.expired, b.expired, c.expired) == (False, True, True)
        assert len(queue) == 0

    run(test)


def test_ended_deadlines_are_forgotten_as_new_ones_start() -> None:
    """Work that ends before its deadline (nearly all) does not pile up until it would have fallen due."""

    async def test(clock: VirtualClock) -> None:
        queue = TimeoutQueue(asyncio.get_running_loop(), 10.0)
        for _ in range(1000):
            queue.start(lambda: None).cancel()
            await asyncio.sleep(0.001)
        assert len(queue) <= 1

    run(test)
