"""The bounded memo (pure logic)."""

from __future__ import annotations

import pytest

from proxygate.memo import MEMO_KEY_MAX, memoized, remember


def test_remember_stores_returns_and_clears_when_full() -> None:
    memo: dict[str, int] = {}
    assert remember(memo, "a", 1, limit=3) == 1
    remember(memo, "b", 2, limit=3)
    remember(memo, "c", 3, limit=3)
    assert memo == {"a": 1, "b": 2, "c": 3}
    assert remember(memo, "d", 4, limit=3) == 4  # full: forgotten at once, then stored
    assert memo == {"d": 4}
    remember(memo, "d", 5, limit=3)
    assert memo == {"d": 5}


def test_a_text_key_longer_than_the_bound_is_answered_not_kept() -> None:
    memo: dict[object, int] = {}
    long = "h" * (MEMO_KEY_MAX + 1)
    assert remember(memo, long, 1) == 1 and memo == {}
    assert remember(memo, long.encode(), 2) == 2 and memo == {}
    assert remember(memo, "h" * MEMO_KEY_MAX, 3) == 3 and len(memo) == 1
    assert remember(memo, (long,), 4) == 4 and len(memo) == 2  # only text keys are measured


def test_memoized_remembers_short_texts_parses_long_ones_and_never_keeps_a_refusal() -> None:
    calls: list[bytes] = []

    @memoized
    def parse(raw: bytes) -> tuple[bytes]:
        calls.append(raw)
        if raw.startswith(b"bad"):
            raise ValueError(raw)
        return (raw,)

    short, long = b"x" * MEMO_KEY_MAX, b"x" * (MEMO_KEY_MAX + 1)
    assert parse(short) is parse(short) and calls == [short]
    assert parse(long) == parse(long) and parse(long) is not parse(long)
    for _ in range(2):
        with pytest.raises(ValueError):
            parse(b"bad")
    assert calls.count(b"bad") == 2
