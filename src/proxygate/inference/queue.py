"""The inference request queue: higher priority first, FIFO within a priority.

One heap per model, so a request is never stuck behind requests for another
model: the scheduler looks at the head of every queue a free worker can
serve. Removal (a client gone, a deadline passed) marks the ticket and the
heap drops it lazily, so push, pop and remove are all O(log n).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

ANY_MODEL = ""  # requests that any worker may serve ("default-model" or none)


@dataclass(eq=False)
class Ticket:
    """One queued request. `payload` is whatever the API layer needs back."""

    model: str
    priority: int
    payload: Any = None
    enqueued_at: float = field(default_factory=time.perf_counter)
    seq: int = 0
    cancelled: bool = False
    queued: bool = False
    excluded: set[str] = field(default_factory=set)  # workers that already failed it

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._heaps: dict[str, list[tuple[int, int, Ticket]]] = {}
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    @property
    def full(self) -> bool:
        return self._live >= self.max_size

    def push(self, ticket: Ticket, *, keep_seq: bool = False) -> None:
        """Queue a ticket; `keep_seq` re-queues a retried ticket at its old place in line."""
        if not keep_seq:
            ticket.seq = next(self._seq)
        ticket.cancelled = False
        ticket.queued = True
        heapq.heappush(self._heaps.setdefault(ticket.model, []), (-ticket.priority, ticket.seq, ticket))
        self._live += 1

    def remove(self, ticket: Ticket) -> bool:
        """Take a ticket out (lazily); whether it was still queued."""
        if not ticket.queued:
            return False
        ticket.queued = False
        ticket.cancelled = True
        self._live -= 1
        return True

    def heads(self) -> Iterator[Ticket]:
        """The first live ticket of each model's queue, best first."""
        heads = []
        for model, heap in list(self._heaps.items()):
            while heap and heap[0][2].cancelled:
                heapq.heappop(heap)
            if heap:
                heads.append(heap[0][2])
            else:
                del self._heaps[model]
        heads.sort(key=Ticket.sort_key)
        return iter(heads)

    def take(self, ticket: Ticket) -> None:
        """Remove a head ticket returned by `heads()` because it is being dispatched."""
        heap = self._heaps[ticket.model]
        assert heap[0][2] is ticket
        heapq.heappop(heap)
        ticket.queued = False
        self._live -= 1
