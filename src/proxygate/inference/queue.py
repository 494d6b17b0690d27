"""The inference request queue: higher priority first, fair share within a priority.

One heap per model, so a request is never stuck behind requests for another
model: the scheduler looks at the head of every queue a free worker can
serve; each model's queue holds at most `max_size`.

Within a priority, tenants (an API key, or a client address without keys)
share by start-time fair queuing on tokens: each ticket gets a start tag,
max(the queue's virtual time, the tenant's last finish tag), and finishes
`cost / weight` later; the lowest start tag goes first (FIFO on ties), and
the virtual time moves to the start tag of each ticket taken. So a tenant
with hundreds queued gets one request's worth of turn, then the next tenant
does: a newcomer waits about one request per competing tenant, not behind
the whole backlog. `age()` raises a waiting ticket one priority level per
aging interval, so nothing starves behind a stream of higher priorities. Removal (a client gone,
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
    # Fair share: whose request it is, its size in tokens, the tenant's weight;
    # the start tag the queue gave it; the priority it asked for (before aging).
    tenant: str = ""
    cost: float = 1.0
    weight: float = 1.0
    start: float = 0.0
    base_priority: int = 0

    def __post_init__(self) -> None:
        self.base_priority = self.base_priority or self.priority

    def sort_key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


class RequestQueue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._heaps: dict[str, list[tuple[int, float, int, int, Ticket]]] = {}
        self._waiting: dict[str, int] = {}
        # Per model queue: its virtual time, and each tenant's last finish tag
        # (forgotten once the virtual time has passed it: bounded by what waits).
        self._vtime: dict[str, float] = {}
        self._finish: dict[str, dict[str, float]] = {}
        self._seq = itertools.count()
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def waiting(self, model: str) -> int:
        return self._waiting.get(model, 0)

    def depths(self) -> dict[tuple[str, int], int]:
        """How many wait, by (model, current priority). O(n): for the status page, not the hot path."""
        out: dict[tuple[str, int], int] = {}
        for model, heap in self._heaps.items():
            for entry in heap:
                if not _stale(entry):
                    key = (model, entry[4].priority)
                    out[key] = out.get(key, 0) + 1
        return out

    def full_for(self, model: str) -> bool:
        return self._waiting.get(model, 0) >= self.max_size

    def push(self, ticket: Ticket, *, keep_seq: bool = False) -> None:
        """Queue a ticket; `keep_seq` re-queues a retried ticket at its old place in line."""
        if not keep_seq:
            ticket.seq = next(self._seq)
            vtime = self._vtime.get(ticket.model, 0.0)
            finishes = self._finish.setdefault(ticket.model, {})
            ticket.start = max(vtime, finishes.get(ticket.tenant, 0.0))
            finishes[ticket.tenant] = ticket.start + ticket.cost / ticket.weight
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
        heapq.heappush(
            self._heaps.setdefault(ticket.model, []),
            (-ticket.priority, ticket.start, ticket.seq, ticket.version, ticket),
        )

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
                heads.append(heap[0][4])
            else:
                del self._heaps[model]
        heads.sort(key=Ticket.sort_key)
        return iter(heads)

    def take(self, ticket: Ticket) -> None:
        """Remove a head ticket returned by `heads()` because it is being dispatched."""
        heap = self._heaps[ticket.model]
        assert heap[0][4] is ticket
        heapq.heappop(heap)
        ticket.queued = False
        self._dequeued(ticket)
        vtime = max(self._vtime.get(ticket.model, 0.0), ticket.start)
        self._vtime[ticket.model] = vtime
        finishes = self._finish.get(ticket.model)
        if finishes and len(finishes) > 64:
            for tenant in [t for t, f in finishes.items() if f <= vtime]:
                del finishes[tenant]

    def age(self, now: float, interval: float) -> int:
        """Raise every waiting ticket one priority level per `interval` waited; how many rose."""
        if interval <= 0:
            return 0
        risen = 0
        for heap in self._heaps.values():
            for entry in list(heap):
                ticket = entry[4]
                if _stale(entry):
                    continue
                aged = min(10, ticket.base_priority + int((now - ticket.enqueued_at) / interval))
                if aged > ticket.priority:
                    self.raise_priority(ticket, aged)
                    risen += 1
        return risen


def _stale(entry: tuple[int, float, int, int, Ticket]) -> bool:
    ticket = entry[4]
    return not ticket.queued or entry[3] != ticket.version
