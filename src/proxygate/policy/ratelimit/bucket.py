"""The leaky bucket, as pure arithmetic shared by every limiter store.

A client's bucket holds `level` units and drains at `rate` units per second;
a request adds one unit and is admitted only if the bucket then holds at most
`capacity`. A rejected request still records the drained level and the new
time (the seed moved only the time, so a client slightly over the limit never
drained and was shut out almost completely).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ...memo import remember

# (limit, remaining, reset seconds) -> the header lines (`Decision.head_lines`).
_HEAD_LINES: dict[tuple[int, int, int], bytes] = {}


@dataclass(slots=True)  # not frozen: one is made per request, and frozen __init__ is slower
class Decision:
    allowed: bool
    limit: int  # the bucket's capacity (burst)
    remaining: int  # whole requests admissible right now
    retry_after: float  # seconds until one more request fits (0 when allowed)
    reset_after: float  # seconds until the bucket is empty again

    def head_lines(self) -> bytes:
        """The X-RateLimit-* headers of an admitted request, rendered."""
        return _head_lines(self.limit, self.remaining, math.ceil(self.reset_after))

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = [
            (b"X-RateLimit-Limit", b"%d" % self.limit),
            (b"X-RateLimit-Remaining", b"%d" % self.remaining),
            (b"X-RateLimit-Reset", b"%d" % math.ceil(self.reset_after)),
        ]
        if not self.allowed:
            out.append((b"Retry-After", b"%d" % max(1, math.ceil(self.retry_after))))
        return out


def _head_lines(limit: int, remaining: int, reset: int) -> bytes:
    """The X-RateLimit-* header lines. Remembered: a client's requests repeat the
    same few values, and formatting three numbers costs as much as the rest of
    the check."""
    values = (limit, remaining, reset)
    lines = _HEAD_LINES.get(values)
    if lines is None:
        lines = remember(
            _HEAD_LINES,
            values,
            b"X-RateLimit-Limit: %d\r\nX-RateLimit-Remaining: %d\r\nX-RateLimit-Reset: %d\r\n" % values,
        )
    return lines


@dataclass(frozen=True, slots=True)
class BucketSpec:
    capacity: int
    rate: float  # units drained per second

    @classmethod
    def per_minute(cls, requests_per_minute: float, burst: int) -> BucketSpec:
        return cls(capacity=burst, rate=requests_per_minute / 60.0)

    def drained(self, level: float, last: float, now: float) -> float:
        """The level at `now` of a bucket that held `level` at time `last`."""
        # Without max() calls: this runs for every request.
        elapsed = now - last
        current = level - elapsed * self.rate if elapsed > 0.0 else level
        return current if current > 0.0 else 0.0

    def take(self, level: float, last: float, now: float, cost: float = 1.0) -> tuple[bool, float]:
        """Admit or reject one request; (allowed, level after) — store both with `now`."""
        return self.charge(level, last, now, cost, False)

    def charge(self, level: float, last: float, now: float, cost: float, force: bool) -> tuple[bool, float]:
        """`take`, or with `force` an unconditional charge (a negative cost gives units back)."""
        current = self.drained(level, last, now)
        if force:
            return True, current + cost if current + cost > 0.0 else 0.0
        if current + cost <= self.capacity + 1e-9:
            return True, current + cost
        return False, current

    def decision(self, allowed: bool, level: float, cost: float = 1.0) -> Decision:
        retry = 0.0 if allowed else max(0.0, (level + cost - self.capacity) / self.rate)
        return Decision(allowed, self.capacity, self.remaining(level), retry, level / self.rate)

    def remaining(self, level: float) -> int:
        """Whole requests admissible with the bucket at `level`."""
        remaining = int(self.capacity - level + 1e-9)  # floor, for the values kept
        return remaining if remaining > 0 else 0

    def head_lines(self, level: float) -> bytes:
        """`decision(True, level).head_lines()` without making the decision: what an
        admitted request's response carries."""
        return _head_lines(self.capacity, self.remaining(level), math.ceil(level / self.rate))

    def idle_after(self, level: float) -> float:
        """Seconds after which a bucket at `level` is empty and may be forgotten."""
        return level / self.rate
