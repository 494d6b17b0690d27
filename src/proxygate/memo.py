"""Bounded memos: answers kept in a plain dict, forgotten all at once when it is full.

The policies answer the same questions for every request (is this host
blocked, is this client allowed, which denied range holds this address,
which key a credential names), the dialer keeps names it resolved and the
shared rate limiter where a client's bucket sits. Each stores through
`remember`: the answers are cheap to compute again, and a flood of distinct
keys cannot grow the process.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

MEMO_MAX = 4096


def remember(memo: dict[K, V], key: K, value: V, limit: int = MEMO_MAX) -> V:
    """Store `value` under `key` (clearing a full memo first) and return it."""
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value
