"""How much of a core this process's event loop uses, measured as it runs.

`--workers N` steers connections by it (`gateway.py`): light load gathers
in process 0 while it has room, and process 0 sheds connections when it is
saturated. The measure is the event-loop thread's CPU time over wall time,
every `interval`, smoothed over the last few: a thread_time() and a
monotonic() per interval, nothing per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

INTERVAL = 0.1


class BusyMeter:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        publish: Callable[[float], None],
        interval: float = INTERVAL,
        cpu_clock: Callable[[], float] = time.thread_time,
        wall_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop = loop
        self.publish = publish
        self.interval = interval
        self.cpu_clock = cpu_clock  # this thread's CPU seconds
        self.wall_clock = wall_clock
        self.share = 0.0
        self.last = 0.0  # the last interval's share alone
        self._cpu = cpu_clock()
        self._at = wall_clock()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = self.loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        cpu, at = self.cpu_clock(), self.wall_clock()
        if at > self._at:
            # Half the last interval, half what came before: a burst shows within
            # two intervals, and one quiet interval does not undo a saturated second.
            self.last = min(1.0, (cpu - self._cpu) / (at - self._at))
            self.share = 0.5 * self.share + 0.5 * self.last
            self.publish(self.share)
        self._cpu, self._at = cpu, at
        self._timer = self.loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
