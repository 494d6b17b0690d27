"""In-process leaky buckets with bounded memory.

A bucket is forgotten once it has drained (nothing is lost: an empty bucket
and a missing one are the same), and at most `max_clients` are tracked, the
least recently seen evicted first, so a flood of distinct keys cannot grow the
process. There is no periodic wipe of every bucket.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .bucket import BucketSpec, Decision


class MemoryLimiter:
    name = "memory"

    def __init__(
        self, spec: BucketSpec, max_clients: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.spec = spec
        self.max_clients = max_clients
        self.clock = clock
        # key -> (level, last); oldest-seen first (a plain dict keeps insertion
        # order, and a bucket is popped and re-inserted when seen: cheaper
        # than an OrderedDict's move on every request).
        self._buckets: dict[str, tuple[float, float]] = {}

    async def check(self, key: str) -> Decision:
        return self.check_now(key)

    def check_now(self, key: str) -> Decision:
        allowed, level = self.charge_now(key, self.spec, 1.0, False)
        return self.spec.decision(allowed, level)

    async def charge(self, key: str, spec: BucketSpec, cost: float, force: bool) -> tuple[bool, float]:
        return self.charge_now(key, spec, cost, force)

    def charge_now(self, key: str, spec: BucketSpec, cost: float, force: bool) -> tuple[bool, float]:
        """Add `cost` to the bucket `key` of shape `spec` (see BucketSpec.charge); (allowed, level)."""
        now = self.clock()
        buckets = self._buckets
        state = buckets.pop(key, None)
        level, last = state if state is not None else (0.0, now)
        allowed, level = spec.charge(level, last, now, cost, force)
        buckets[key] = (level, now)
        if len(buckets) > self.max_clients:
            self._evict(now)
        return allowed, level

    def _evict(self, now: float) -> None:
        """Drop drained buckets from the old end; if none, the oldest one."""
        buckets = self._buckets
        spec = self.spec
        for key, (level, last) in list(buckets.items())[:64]:
            if spec.drained(level, last, now) == 0.0:
                del buckets[key]
        while len(buckets) > self.max_clients:
            del buckets[next(iter(buckets))]

    def sweep(self) -> int:
        """Forget every drained bucket; how many were dropped."""
        now = self.clock()
        spec = self.spec
        drained = [k for k, (level, last) in self._buckets.items() if spec.drained(level, last, now) == 0.0]
        for key in drained:
            del self._buckets[key]
        return len(drained)

    def __len__(self) -> int:
        return len(self._buckets)

    async def aclose(self) -> None:
        self._buckets.clear()
