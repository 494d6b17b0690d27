"""The inference request queue: higher priority first, FIFO within a priority.

One heap per model, so a request is never stuck behind requests for another
model: the scheduler looks at the head of every queue a free worker can
serve; each model's queue holds at most `max_size`. Removal (a client gone,
a deadline passed) and a raised priority (a coalesced generation gaining a
more urgent client) leave the old heap entry behind, marked stale by the
ticket's version, and the heap drops it lazily: push, pop, remove and
re-prioritise are all O(log n).
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
    queued: bool = False
    excluded: set[str] = field(default_factory=set)  # workers that already failed it
    # Prefix-affine placement: the prompt's block digests, its length in
    # blocks, and how many of them the chosen worker was believed to hold.
    blocks: tuple[bytes, ...] = ()
    block_span: float = 0.0
    predicted_blocks: int = 0
    served_model: str = ""  # the model the worker it went to serves ("" = unknown)
    version: int = 0  # which heap entry is the live one

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._heaps: dict[str, list[tuple[int, int, int, Ticket]]] = {}
        self._waiting: dict[str, int] = {}
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def waiting(self, model: str) -> int:
        return self._waiting.get(model, 0)

    def full_for(self, model: str) -> bool:
        return self._waiting.get(model, 0) >= self.max_size

    def push(self, ticket: Ticket, *, keep_seq: bool = False) -> None:
        """Queue a ticket; `keep_seq` re-queues a retried ticket at its old place in line."""
        if not keep_seq:
            ticket.seq = next(self._seq)
        ticket.queued = True
        self._push_entry(ticket)
        self._live += 1
        self._waiting[ticket.model] = self._waiting.get(ticket.model, 0) + 1

    def raise_priority(self, ticket: Ticket, priority: int) -> None:
        """Serve a ticket at `priority` from now on (never lowers it)."""
        if priority <= ticket.priority:
            return
        ticket.priority = priority
        if ticket.queued:
            self._push_entry(ticket)  # the old entry is now stale

    def _push_entry(self, ticket: Ticket) -> None:
        ticket.version += 1
        heapq.heappush(self._heaps.setdefault(ticket.model, []), (-ticket.priority, ticket.seq, ticket.version, ticket))

    def remove(self, ticket: Ticket) -> bool:
        """Take a ticket out (lazily); whether it was still queued."""
        if not ticket.queued:
            return False
        ticket.queued = False
        self._dequeued(ticket)
        return True

    def _dequeued(self, ticket: Ticket) -> None:
        self._live -= 1
        left = self._waiting[ticket.model] - 1
        if left:
            self._waiting[ticket.model] = left
        else:
            del self._waiting[ticket.model]

    def heads(self) -> Iterator[Ticket]:
        """The first live ticket of each model's queue, best first."""
        heads = []
        for model, heap in list(self._heaps.items()):
            while heap and _stale(heap[0]):
                heapq.heappop(heap)
            if heap:
                heads.append(heap[0][3])
            else:
                del self._heaps[model]
        heads.sort(key=Ticket.sort_key)
        return iter(heads)

    def take(self, ticket: Ticket) -> None:
        """Remove a head ticket returned by `heads()` because it is being dispatched."""
        heap = self._heaps[ticket.model]
        assert heap[0][3] is ticket
        heapq.heappop(heap)
        ticket.queued = False
        self._dequeued(ticket)


def _stale(entry: tuple[int, int, int, Ticket]) -> bool:
    ticket = entry[3]
    return not ticket.queued or entry[2] != ticket.version
