"""Per-key budgets: requests per minute and tokens per minute, exactly counted.

Both are leaky buckets in the limiter's store (memory, shared memory, or
Redis so replicas share them; one atomic script per check): a bucket holds a
minute's budget and drains at budget/60 per second. A request reserves one
request and `prompt tokens + max_tokens` tokens at admission (prompt tokens
estimated until the worker has counted them; never more than the whole
budget, so a large `max_tokens` cannot lock a key out); when the generation
ends — finished, failed or cancelled, streamed or not — the reservation is
settled to what the worker really counted (prompt + completion tokens), and
the unused part flows back. Over budget → 429 with `Retry-After` from the
bucket and OpenAI's `x-ratelimit-*` headers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import ServiceUnavailable, TooManyRequests
from .keys import ApiKey
from .ratelimit import BucketSpec, LimiterUnavailable

log = logging.getLogger("proxygate.budgets")


class BudgetStore(Protocol):
    async def charge(self, key: str, spec: BucketSpec, cost: float, force: bool) -> tuple[bool, float]: ...


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: `1m30s`, `6s`, `250ms`."""
    if seconds < 1:
        return b"%dms" % math.ceil(seconds * 1000)
    minutes, rest = divmod(math.ceil(seconds), 60)
    return (b"%dm%ds" % (minutes, rest)) if minutes else (b"%ds" % rest)


def _minute(per_minute: int) -> BucketSpec:
    return BucketSpec(capacity=per_minute, rate=per_minute / 60.0)


@dataclass(slots=True)
class Reservation:
    """What one admitted request holds against its key's budgets."""

    budgets: Budgets
    key: ApiKey
    tokens: int  # reserved
    head: bytes = b""  # the x-ratelimit-* header lines of the admitted request
    settled: bool = field(default=False)

    def settle(self, used_tokens: int) -> None:
        """Charge what was really used instead of the reservation (in the background: never blocks a stream's end)."""
        if self.settled:
            return
        self.settled = True
        delta = used_tokens - self.tokens
        if delta and self.key.tokens_per_minute:
            self.budgets.settle_later(self.key, delta)


class Budgets:
    def __init__(self, store: BudgetStore, *, fail_open: bool = True) -> None:
        self.store = store
        self.fail_open = fail_open
        self._pending: set[asyncio.Task[tuple[bool, float]]] = set()

    async def reserve(self, key: ApiKey, tokens: int) -> Reservation:
        """Admit one request of about `tokens` tokens for `key`, or raise 429."""
        head = b""
        requests_ok = False
        if key.requests_per_minute:
            spec = _minute(key.requests_per_minute)
            allowed, level = await self._charge(f"b:r:{key.name}", spec, 1, False)
            head += self._lines(b"requests", spec, level)
            if not allowed:
                raise self._refusal("requests", key, spec, level, 1)
            requests_ok = True
        reserved = 0
        if key.tokens_per_minute:
            spec = _minute(key.tokens_per_minute)
            reserved = min(tokens, key.tokens_per_minute)
            allowed, level = await self._charge(f"b:t:{key.name}", spec, reserved, False)
            head += self._lines(b"tokens", spec, level)
            if not allowed:
                if requests_ok:  # the request was not served: give its unit back
                    assert key.requests_per_minute
                    await self._charge(f"b:r:{key.name}", _minute(key.requests_per_minute), -1, True)
                raise self._refusal("tokens", key, spec, level, reserved)
        return Reservation(self, key, reserved, head)

    def settle_later(self, key: ApiKey, delta: int) -> None:
        assert key.tokens_per_minute
        task = asyncio.get_running_loop().create_task(
            self._charge(f"b:t:{key.name}", _minute(key.tokens_per_minute), delta, True)
        )
        self._pending.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[tuple[bool, float]]) -> None:
        self._pending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("token budget not settled: %s", task.exception())

    async def _charge(self, bucket: str, spec: BucketSpec, cost: float, force: bool) -> tuple[bool, float]:
        try:
            return await self.store.charge(bucket, spec, cost, force)
        except LimiterUnavailable as exc:
            if force or self.fail_open:
                if not force:
                    log.warning("budget store unavailable, admitting: %s", exc)
                return True, 0.0
            raise ServiceUnavailable("budget store unavailable", headers=[(b"Retry-After", b"1")]) from None

    @staticmethod
    def _lines(kind: bytes, spec: BucketSpec, level: float) -> bytes:
        remaining = max(0, math.floor(spec.capacity - level + 1e-9))
        return b"x-ratelimit-limit-%s: %d\r\nx-ratelimit-remaining-%s: %d\r\nx-ratelimit-reset-%s: %s\r\n" % (
            kind,
            spec.capacity,
            kind,
            remaining,
            kind,
            _duration(level / spec.rate),
        )

    @staticmethod
    def _refusal(kind: str, key: ApiKey, spec: BucketSpec, level: float, cost: float) -> TooManyRequests:
        retry = max(1, math.ceil((level + cost - spec.capacity) / spec.rate))
        remaining = max(0, math.floor(spec.capacity - level + 1e-9))
        k = kind.encode()
        return TooManyRequests(
            f"key {key.name!r} is over its {kind} per minute budget ({spec.capacity}); retry in {retry}s",
            headers=[
                (b"Retry-After", b"%d" % retry),
                (b"x-ratelimit-limit-" + k, b"%d" % spec.capacity),
                (b"x-ratelimit-remaining-" + k, b"%d" % remaining),
                (b"x-ratelimit-reset-" + k, _duration(level / spec.rate)),
            ],
        )

    async def aclose(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
