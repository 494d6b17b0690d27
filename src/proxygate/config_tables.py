"""Reading fields of the TOML tables in our configuration files (routes, API keys)."""

from __future__ import annotations

from typing import Any


def optional_int(
    table: dict[str, Any], key: str, where: str, error: type[Exception], low: int, high: int | None = None
) -> int | None:
    """`table[key]` as an integer in [low, high], None when absent; else `error` naming `where.key`."""
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low}..{high}" if high is not None else f"≥ {low}"
        raise error(f"{where}.{key} must be an integer {bound}")
    return value
