"""The prefix cache's index: which prompt prefixes have KV in the block pool (pure).

A prompt's tokens are cut into blocks of `block_size`; each full block is
named by a digest of its tokens chained with its parent's digest, so equal
digests mean equal whole prefixes (vLLM's automatic prefix caching). The
index maps digests to block numbers of a fixed pool, so memory never grows
with traffic; when the pool is full the least recently used block is
reused. A lookup touches the matched chain from its end back to its start,
so a parent is always more recent than its children and leaves are evicted
first. Blocks are copied into a sequence's own KV at admission, so nothing
here is ever pinned by a running sequence.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

from ..engines.base import CacheCounters


def block_digests(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Chained digests of every full block of `tokens`."""
    out: list[bytes] = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        chunk = array("i", tokens[start : start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        out.append(parent)
    return out


class PrefixIndex:
    def __init__(self, capacity_blocks: int, block_size: int) -> None:
        self.capacity = capacity_blocks
        self.block_size = block_size
        self._blocks: OrderedDict[bytes, int] = OrderedDict()  # digest -> pool block, oldest first
        self._free = list(range(capacity_blocks - 1, -1, -1))
        self.counters = CacheCounters()

    @property
    def used(self) -> int:
        return len(self._blocks)

    def match(self, digests: Sequence[bytes]) -> list[int]:
        """Pool blocks of the longest cached prefix of this chain (touched as most recent)."""
        found: list[int] = []
        for d in digests:
            block = self._blocks.get(d)
            if block is None:
                break
            found.append(block)
        for d in reversed(digests[: len(found)]):
            self._blocks.move_to_end(d)
        return found

    def insert(self, digests: Sequence[bytes]) -> list[tuple[int, int]]:
        """Make room for the chain's blocks not yet cached: (index in chain, pool block) to fill.

        A chain longer than the pool keeps its first blocks (a prefix is
        useless without its parents).
        """
        digests = digests[: self.capacity]
        new: list[tuple[int, int]] = []
        for i, d in enumerate(digests):
            if d in self._blocks:
                self._blocks.move_to_end(d)
                continue
            block = self._take()
            self._blocks[d] = block
            new.append((i, block))
        for d in reversed(digests):
            self._blocks.move_to_end(d)
        return new

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        _, block = self._blocks.popitem(last=False)
        self.counters.evictions += 1
        return block
