"""The bounded memo (pure logic)."""

from __future__ import annotations

from proxygate.memo import remember


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
