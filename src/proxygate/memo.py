"""Bounded memos: answers kept in a plain dict, forgotten all at once when it is full.

The policies answer the same questions for every request (is this host
blocked, is this client allowed, which denied range holds this address,
which key a credential names), the dialer keeps names it resolved and the
shared rate limiter where a client's bucket sits. Each stores through
`remember`; a parse that depends on its text alone (a request target, an
address) is `memoized`. The answers are cheap to compute again, and a flood
of distinct keys cannot grow the process: a memo holds at most MEMO_MAX
keys, and a text key longer than MEMO_KEY_MAX is never kept (a client's
bytes can be 64 KiB long; MEMO_MAX of those would be 256 MiB).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")
Text = TypeVar("Text", str, bytes)

MEMO_MAX = 4096
MEMO_KEY_MAX = 512


def remember(memo: dict[K, V], key: K, value: V, limit: int = MEMO_MAX) -> V:
    """Store `value` under `key` (clearing a full memo first) and return it; a text
    key longer than MEMO_KEY_MAX is not stored."""
    if isinstance(key, (str, bytes)) and len(key) > MEMO_KEY_MAX:
        return value
    if len(memo) >= limit:
        memo.clear()
    memo[key] = value
    return value


def memoized(parse: Callable[[Text], V]) -> Callable[[Text], V]:
    """`parse` with its answers remembered (the MEMO_MAX most recent) for texts of
    at most MEMO_KEY_MAX; a longer text is parsed each time. An exception is
    never remembered: a refusal is raised each time."""
    remembered = functools.lru_cache(maxsize=MEMO_MAX)(parse)

    @functools.wraps(parse)
    def lookup(text: Text) -> V:
        return remembered(text) if len(text) <= MEMO_KEY_MAX else parse(text)

    return lookup
