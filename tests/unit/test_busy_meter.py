"""BusyMeter: the event loop's share of a core, from its thread's CPU time over wall time
(both clocks injected here, so the shares are exact)."""

from __future__ import annotations

import asyncio

import pytest

from proxygate.busy import BusyMeter


class Clocks:
    def __init__(self) -> None:
        self.cpu = 5.0
        self.wall = 1000.0

    def run(self, wall: float, busy: float) -> None:
        """`wall` seconds pass, `busy` of them on the CPU."""
        self.wall += wall
        self.cpu += wall * busy


def _published(intervals: list[tuple[float, float]]) -> list[float]:
    """What a meter on injected clocks publishes over (wall seconds, share busy) intervals."""

    async def main() -> list[float]:
        clocks = Clocks()
        seen: list[float] = []
        meter = BusyMeter(
            asyncio.get_running_loop(), seen.append, cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall
        )
        for wall, busy in intervals:
            clocks.run(wall, busy)
            meter._tick()
        meter.stop()
        return seen

    return asyncio.run(main())


def test_the_share_follows_the_cpu_time_smoothed_over_two_intervals() -> None:
    shares = _published([(0.1, busy) for busy in (1.0, 1.0, 1.0, 0.0, 0.0, 0.3)])
    assert shares == pytest.approx([0.5, 0.75, 0.875, 0.4375, 0.21875, 0.259375])


def test_the_last_interval_is_kept_alone_too() -> None:
    """Steering reacts to it: a load that saturates the owner from idle reads 1.0 after one tick."""

    async def main() -> list[float]:
        clocks = Clocks()
        meter = BusyMeter(
            asyncio.get_running_loop(), lambda _: None, cpu_clock=lambda: clocks.cpu, wall_clock=lambda: clocks.wall
        )
        lasts = []
        for busy in (1.0, 0.2):
            clocks.run(0.1, busy)
            meter._tick()
            lasts.append(meter.last)
        meter.stop()
        return lasts

    assert asyncio.run(main()) == pytest.approx([1.0, 0.2])


def test_a_share_never_exceeds_one_core() -> None:
    # A process's threads together could; the loop's thread cannot, but clocks skew.
    assert _published([(0.1, 3.0)]) == [0.5]


def test_it_measures_the_running_thread() -> None:
    """With the real clocks: a loop that only sleeps reads (close to) idle."""

    async def main() -> list[float]:
        seen: list[float] = []
        meter = BusyMeter(asyncio.get_running_loop(), seen.append, interval=0.02)
        meter.start()
        while len(seen) < 3:
            await asyncio.sleep(0.02)
        meter.stop()
        return seen

    assert asyncio.run(main())[-1] < 0.5
