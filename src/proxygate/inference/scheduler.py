"""Which queued request runs on which worker, decided on snapshots, no I/O.

Called whenever something changes (a request queued, a slot freed, a worker
admitted). It dispatches the best ticket that some free worker can serve, to
the worker the placement policy picks, and repeats until nothing more fits:
capacity is each worker's reported `max_concurrency`, never one request per
worker.
"""

from __future__ import annotations

from collections.abc import Sequence

from .placement import LeastLoaded, Placement, Slot
from .queue import RequestQueue, Ticket


def assign(
    queue: RequestQueue, workers: Sequence[Slot], placement: Placement | None = None
) -> list[tuple[Ticket, Slot]]:
    """Take dispatchable tickets off the queue; each worker's `active` is raised for its share."""
    place = placement or LeastLoaded()
    out: list[tuple[Ticket, Slot]] = []
    while True:
        for ticket in queue.heads():
            worker = place.choose(workers, ticket)
            if worker is not None:
                queue.take(ticket)
                worker.active += 1
                out.append((ticket, worker))
                break
        else:
            return out
