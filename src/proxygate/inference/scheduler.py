"""Which queued request runs on which worker, decided on snapshots, no I/O.

Called whenever something changes (a request queued, a slot freed, a worker
admitted). It dispatches the best ticket that some free worker can serve, to
the least-loaded such worker, and repeats until nothing more fits: capacity
is each worker's reported `max_concurrency`, never one request per worker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .queue import RequestQueue, Ticket


class Slot(Protocol):
    id: str
    active: int
    capacity: int

    @property
    def free_slots(self) -> int: ...

    def serves(self, model: str) -> bool: ...


def least_loaded(workers: Sequence[Slot], ticket: Ticket) -> Slot | None:
    best: Slot | None = None
    best_key = (2.0, 0)
    for worker in workers:
        if worker.free_slots <= 0 or not worker.serves(ticket.model) or worker.id in ticket.excluded:
            continue
        key = (worker.active / worker.capacity, worker.active)
        if best is None or key < best_key:
            best, best_key = worker, key
    return best


def assign(queue: RequestQueue, workers: Sequence[Slot]) -> list[tuple[Ticket, Slot]]:
    """Take dispatchable tickets off the queue; each worker's `active` is raised for its share."""
    out: list[tuple[Ticket, Slot]] = []
    while True:
        for ticket in queue.heads():
            worker = least_loaded(workers, ticket)
            if worker is not None:
                queue.take(ticket)
                worker.active += 1
                out.append((ticket, worker))
                break
        else:
            return out
