"""A priority-ordered gate for engines that keep no queue of their own (echo).

At most `capacity` holders at once; the others wait, highest priority first,
then in arrival order. A waiter that is cancelled leaves the queue.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class PriorityGate:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.running = 0
        self.peak_running = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(1 for _, _, f in self._waiters if not f.done())

    @asynccontextmanager
    async def slot(self, priority: int) -> AsyncIterator[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (-priority, next(self._order), fut))
        self._wake()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted as it was cancelled: pass it on
                self.running -= 1
                self._wake()
            raise
        self.peak_running = max(self.peak_running, self.running)
        try:
            yield
        finally:
            self.running -= 1
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self.running < self.capacity:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                self.running += 1
                fut.set_result(None)
