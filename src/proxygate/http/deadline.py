"""One lazily moved timer per connection: which deadline is armed, and when it fires.

A busy keep-alive connection re-arms its read or idle deadline for every
request. Moving a deadline later is only an assignment here; the loop's
timer is rescheduled only when a deadline moves earlier, and a timer that
fires early (its deadline was moved later meanwhile) re-arms itself for the
new time. So a connection costs at most one live loop timer and a few
timer operations per timeout period, not several per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

NONE, READ, IDLE = 0, 1, 2  # what the armed deadline is for


class Deadline:
    __slots__ = ("loop", "on_expiry", "kind", "_at", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expiry: Callable[[int], None]) -> None:
        self.loop = loop
        self.on_expiry = on_expiry  # called with the kind of the deadline that passed
        self.kind = NONE
        self._at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def arm(self, delay: float, kind: int) -> None:
        """Expire `delay` seconds from now (replacing any armed deadline); no deadline if `delay` <= 0."""
        if delay <= 0:
            self.kind = NONE
            return
        at = self.loop.time() + delay
        self._at = at
        self.kind = kind
        if self._timer is None or at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self.loop.call_at(at, self._fire)

    def disarm(self) -> None:
        """No deadline (the loop's timer, if any, finds nothing to do when it fires)."""
        self.kind = NONE

    def pass_to(self, on_expiry: Callable[[int], None]) -> None:
        """No deadline, and a new owner: what is armed from now on calls `on_expiry`.
        The loop's timer stays, so a later deadline of the new owner costs no new one."""
        self.kind = NONE
        self.on_expiry = on_expiry

    def cancel(self) -> None:
        """No deadline and no loop timer: the connection is gone.

        The callback goes too: it is a method of the object that holds this
        deadline, and the cycle between them would leave both, and all they
        hold, to the cyclic garbage collector instead of reference counts.
        """
        self.kind = NONE
        self.on_expiry = _gone
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        kind = self.kind
        if kind == NONE:
            return
        if self.loop.time() < self._at:
            self._timer_at = self._at
            self._timer = self.loop.call_at(self._at, self._fire)
            return
        self.kind = NONE
        self.on_expiry(kind)


def _gone(kind: int) -> None:
    """A cancelled deadline's callback: nothing is left to call."""
