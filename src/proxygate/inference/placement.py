"""Which free worker a dispatchable request goes to: `--routing-policy`.

- `least-loaded`: the worker with the smallest share of its capacity in use.
- `round-robin`: the next worker in turn that has a free slot.
- `prefix` (default): where the request's prompt prefix most likely sits in a
  worker's KV cache, balanced against load.

The prefix policy hashes the prompt text in 64-byte blocks, each digest
chained to the one before (as vLLM names KV blocks), and keeps per worker an
LRU of the block digests it sent there, capped at `max_blocks` per worker:
memory never grows with traffic. A request goes to the worker that holds the
longest run of its leading blocks, unless that worker is busier than the
least-loaded free one by more than `BALANCE` of its capacity (SGLang's
cache-aware router keeps the same guard against piling a hot prefix onto one
worker); then it goes to the least-loaded one, which from then on holds the
prefix too; so does a request whose prefix's workers are all full. The
guard is loose on purpose: a worker with a free slot and the prefix in cache
is nearly always the fastest place (in the benchmark, 0.5 instead of 0.75
lost a tenth of the hits to needless spills). A prefix no worker holds goes by rendezvous hashing of its first
block, skipping workers that already hold more than `1 + SPREAD` times the
mean number of blocks (consistent hashing with bounded loads), so distinct
prefixes spread evenly and gateway replicas that see the same traffic pick
the same worker without talking to each other.

What a worker reports corrects the index: when its `cached_tokens` shows that
a prefix we thought it held is gone, its cache evicted it, and (its cache
being LRU) everything it was sent before that prefix is gone too.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from .queue import Ticket

BLOCK_BYTES = 64
MAX_PROMPT_BLOCKS = 64  # look at the first 4 KiB of a prompt
BALANCE = 0.75
SPREAD = 0.25
POLICIES = ("prefix", "least-loaded", "round-robin")


class Slot(Protocol):
    id: str
    active: int
    capacity: int

    @property
    def available(self) -> bool: ...

    @property
    def free_slots(self) -> int: ...

    def serves(self, model: str) -> bool: ...


class Placement(Protocol):
    def choose(self, workers: Sequence[Slot], ticket: Ticket) -> Slot | None:
        """A free worker for `ticket`, or None when none can take it now."""
        ...

    def observed(self, worker_id: str, ticket: Ticket, prompt_tokens: int, cached_tokens: int) -> None:
        """The worker's first answer for `ticket`: what it had cached."""
        ...


def prompt_blocks(text: str) -> tuple[tuple[bytes, ...], float]:
    """Chained digests of the prompt's whole 64-byte blocks, and its length in blocks."""
    data = text.encode("utf-8", "surrogatepass")
    digests: list[bytes] = []
    prev = b""
    end = min(len(data) - len(data) % BLOCK_BYTES, BLOCK_BYTES * MAX_PROMPT_BLOCKS)
    for start in range(0, end, BLOCK_BYTES):
        prev = hashlib.blake2b(prev + data[start : start + BLOCK_BYTES], digest_size=8).digest()
        digests.append(prev)
    return tuple(digests), len(data) / BLOCK_BYTES


def rendezvous(key: bytes, worker_id: str) -> int:
    """Highest-random-weight score: the same on every replica, for every worker set."""
    return int.from_bytes(hashlib.blake2b(key + worker_id.encode(), digest_size=8).digest(), "big")


def _load(worker: Slot) -> float:
    return worker.active / worker.capacity


def _eligible(workers: Sequence[Slot], ticket: Ticket) -> list[Slot]:
    return [w for w in workers if w.free_slots > 0 and w.serves(ticket.model) and w.id not in ticket.excluded]


class LeastLoaded:
    def choose(self, workers: Sequence[Slot], ticket: Ticket) -> Slot | None:
        eligible = _eligible(workers, ticket)
        return min(eligible, key=lambda w: (_load(w), w.active)) if eligible else None

    def observed(self, worker_id: str, ticket: Ticket, prompt_tokens: int, cached_tokens: int) -> None:
        return None


class RoundRobin:
    def __init__(self) -> None:
        self._turn = 0

    def choose(self, workers: Sequence[Slot], ticket: Ticket) -> Slot | None:
        n = len(workers)
        for step in range(n):
            worker = workers[(self._turn + step) % n]
            if worker.free_slots > 0 and worker.serves(ticket.model) and worker.id not in ticket.excluded:
                self._turn = (self._turn + step + 1) % n
                return worker
        return None

    def observed(self, worker_id: str, ticket: Ticket, prompt_tokens: int, cached_tokens: int) -> None:
        return None


class PrefixAffinity:
    def __init__(self, max_blocks: int = 16384) -> None:
        self.max_blocks = max_blocks
        self._held: dict[str, OrderedDict[bytes, None]] = {}

    def held(self, worker_id: str) -> OrderedDict[bytes, None]:
        held = self._held.get(worker_id)
        if held is None:
            held = self._held[worker_id] = OrderedDict()
        return held

    def match(self, worker_id: str, blocks: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt we believe the worker holds."""
        held = self._held.get(worker_id)
        if not held:
            return 0
        n = 0
        for digest in blocks:
            if digest not in held:
                break
            n += 1
        return n

    def choose(self, workers: Sequence[Slot], ticket: Ticket) -> Slot | None:
        eligible = _eligible(workers, ticket)
        if not eligible:
            return None
        blocks = ticket.blocks
        if not blocks:
            return min(eligible, key=lambda w: (_load(w), w.active))
        key = blocks[0]
        serving = [w for w in workers if w.available and w.serves(ticket.model) and w.id not in ticket.excluded]
        matches = {w.id: self.match(w.id, blocks) for w in serving}
        best = max(matches.values())
        lightest = min(_load(w) for w in eligible)
        chosen: Slot
        if best > 0:
            # Among the workers holding the longest match: a free one not much
            # busier than the lightest, the same one every time (rendezvous)
            # so that a prefix's copies elsewhere are only overflow.
            holder = min(
                (w for w in serving if matches[w.id] == best),
                key=lambda w: (w.free_slots <= 0, _load(w) - lightest > BALANCE, -rendezvous(key, w.id)),
            )
            if holder.free_slots > 0 and _load(holder) - lightest <= BALANCE:
                chosen = holder
            else:
                # The longest match among workers not much busier than the lightest.
                chosen = min(
                    eligible,
                    key=lambda w: (_load(w) - lightest > BALANCE, -matches[w.id], _load(w), -rendezvous(key, w.id)),
                )
        else:
            sizes = {w.id: len(self._held.get(w.id) or ()) for w in eligible}
            bound = (1 + SPREAD) * (sum(sizes.values()) + len(blocks)) / len(eligible)
            ranked = sorted(eligible, key=lambda w: -rendezvous(key, w.id))
            chosen = next(
                (w for w in ranked if sizes[w.id] + len(blocks) <= bound),
                min(ranked, key=lambda w: sizes[w.id]),
            )
        ticket.predicted_blocks = matches[chosen.id]
        # Claim the prefix for the chosen worker now, so the same prefix's
        # next requests follow it before this one's first token; blocks it
        # holds already keep their place until the worker confirms them.
        held = self.held(chosen.id)
        for digest in blocks:
            if digest not in held:
                held[digest] = None
        self._trim(held)
        return chosen

    def observed(self, worker_id: str, ticket: Ticket, prompt_tokens: int, cached_tokens: int) -> None:
        blocks = ticket.blocks
        if not blocks:
            return
        held = self.held(worker_id)
        if prompt_tokens > 0:
            reported = int(cached_tokens / prompt_tokens * ticket.block_span)
            if reported + 1 < ticket.predicted_blocks:
                _forget_through(held, blocks[reported])
        for digest in blocks:
            held[digest] = None
            held.move_to_end(digest)
        self._trim(held)

    def _trim(self, held: OrderedDict[bytes, None]) -> None:
        while len(held) > self.max_blocks:
            held.popitem(last=False)


def _forget_through(held: OrderedDict[bytes, None], digest: bytes) -> None:
    """Drop `digest` and every block the worker was sent before it."""
    if digest not in held:
        return
    while held:
        oldest, _ = held.popitem(last=False)
        if oldest == digest:
            return


def build_placement(policy: str) -> Placement:
    if policy == "least-loaded":
        return LeastLoaded()
    if policy == "round-robin":
        return RoundRobin()
    if policy == "prefix":
        return PrefixAffinity()
    raise ValueError(f"unknown routing policy {policy!r}")
