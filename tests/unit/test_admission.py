"""PriorityGate: the echo engine's admission, highest priority first, cancellation-safe."""

from __future__ import annotations

import asyncio

from proxygate.worker.admission import PriorityGate


def test_waiters_enter_by_priority_then_arrival() -> None:
    async def main() -> list[str]:
        gate = PriorityGate(1)
        order: list[str] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with gate.slot(1):
                order.append("first")
                await release.wait()

        async def waiter(name: str, priority: int) -> None:
            async with gate.slot(priority):
                order.append(name)

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(waiter(n, p)) for n, p in (("low", 1), ("high", 9), ("low2", 1), ("mid", 5))]
        while gate.waiting < 4:
            await asyncio.sleep(0)
        assert gate.running == 1
        release.set()
        await asyncio.gather(first, *tasks)
        assert gate.running == 0 and gate.peak_running == 1
        return order

    assert asyncio.run(main()) == ["first", "high", "mid", "low", "low2"]


def test_cancelled_waiter_leaves_and_frees_nothing_it_did_not_hold() -> None:
    async def main() -> None:
        gate = PriorityGate(1)
        inside = asyncio.Event()
        release = asyncio.Event()

        async def holder() -> None:
            async with gate.slot(1):
                inside.set()
                await release.wait()

        h = asyncio.create_task(holder())
        await inside.wait()
        w = asyncio.create_task(gate.slot(5).__aenter__())
        while gate.waiting < 1:
            await asyncio.sleep(0)
        w.cancel()
        await asyncio.gather(w, return_exceptions=True)
        assert gate.waiting == 0 and gate.running == 1
        release.set()
        await h
        assert gate.running == 0
        async with gate.slot(1):  # the gate still admits
            assert gate.running == 1

    asyncio.run(main())
