"""The dial deadline (`proxy/dial.py`): a connect that never completes is a 504 exactly at
`-dial-timeout`, and a cancellation from outside (the client left) stays a cancellation.

The connect itself is replaced by one that never completes (the unit here is the
deadline, not the socket; tests/integration/test_forward.py dials a silent listener).
"""

from __future__ import annotations

import asyncio

import pytest

from proxygate.config import GatewaySettings
from proxygate.errors import GatewayTimeout
from proxygate.policy.destinations import DestinationPolicy
from proxygate.proxy import dial
from proxygate.proxy.dial import Dialer
from tests.support.protocol import VirtualClock, run


@pytest.fixture
def silent_connect(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every connect waits for ever; returns the loop times at which connects started."""
    started: list[float] = []

    async def never(loop: asyncio.AbstractEventLoop, *args: object) -> object:
        started.append(loop.time())
        await loop.create_future()
        raise AssertionError("unreachable")

    monkeypatch.setattr(dial, "_connect", never)
    return started


def _dialer(timeout: float) -> Dialer:
    policy = DestinationPolicy.from_settings(GatewaySettings(deny_destinations=()), bound_port=8080)
    return Dialer(policy, timeout)


def test_a_connect_that_never_completes_is_a_504_at_the_dial_timeout(silent_connect: list[float]) -> None:
    async def test(clock: VirtualClock) -> None:
        loop = asyncio.get_running_loop()
        with pytest.raises(GatewayTimeout, match="after 10s"):
            await _dialer(10.0).open("127.0.0.1", 9, asyncio.Protocol)
        assert silent_connect and loop.time() - silent_connect[0] == pytest.approx(10.0)
        current = asyncio.current_task()
        assert current is not None and current.cancelling() == 0, "the deadline's cancellation was taken back"

    run(test)


def test_a_cancelled_dial_stays_cancelled(silent_connect: list[float]) -> None:
    async def test(clock: VirtualClock) -> None:
        dialing = asyncio.ensure_future(_dialer(10.0).open("127.0.0.1", 9, asyncio.Protocol))
        await asyncio.sleep(1.0)  # virtual time: the connect has started, the deadline is 9 s away
        assert silent_connect and not dialing.done()
        dialing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dialing
        await asyncio.sleep(20.0)  # past where the deadline was: nothing fires into a finished task

    run(test)


def test_no_dial_timeout_waits_as_long_as_the_connect(silent_connect: list[float]) -> None:
    async def test(clock: VirtualClock) -> None:
        dialing = asyncio.ensure_future(_dialer(0.0).open("127.0.0.1", 9, asyncio.Protocol))
        await asyncio.sleep(600.0)  # ten virtual minutes
        assert not dialing.done()
        dialing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dialing

    run(test)


def test_after_a_connect_the_deadline_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    """The task that dialled goes on (a tunnel lasts hours): nothing cancels it at the old deadline."""

    async def at_once(loop: asyncio.AbstractEventLoop, *args: object) -> tuple[str, str]:
        return "transport", "protocol"

    monkeypatch.setattr(dial, "_connect", at_once)

    async def test(clock: VirtualClock) -> None:
        assert await _dialer(10.0).open("127.0.0.1", 9, asyncio.Protocol) == ("transport", "protocol")
        await asyncio.sleep(20.0)  # past the deadline: this sleep must end, not be cancelled

    run(test)


def test_a_name_that_never_resolves_is_a_504_at_the_dial_timeout() -> None:
    """The deadline covers the whole dial, the name's resolution included."""

    async def never(*args: object, **kwargs: object) -> list[object]:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    async def test(clock: VirtualClock) -> None:
        policy = DestinationPolicy.from_settings(GatewaySettings(deny_destinations=()), bound_port=8080)
        started = clock.now
        with pytest.raises(GatewayTimeout, match="after 10s"):
            await Dialer(policy, 10.0, getaddrinfo=never).open("slow.test", 443, asyncio.Protocol)
        assert clock.now - started == pytest.approx(10.0)

    run(test)


def test_dials_started_in_a_row_each_time_out_at_their_own_deadline(silent_connect: list[float]) -> None:
    """One loop timer serves every dial's deadline (`timeout_queue.py`); each still falls due
    exactly at its own start plus the dial timeout, and one that ended early never fires."""

    async def test(clock: VirtualClock) -> None:
        dialer = _dialer(10.0)
        ended: dict[int, float] = {}

        async def dial(i: int) -> None:
            try:
                await dialer.open("127.0.0.1", 9, asyncio.Protocol)
            except GatewayTimeout:
                ended[i] = clock.now

        first = asyncio.ensure_future(dial(0))
        await asyncio.sleep(1.0)
        cancelled = asyncio.ensure_future(dial(1))
        await asyncio.sleep(1.0)
        third = asyncio.ensure_future(dial(2))
        await asyncio.sleep(1.0)
        cancelled.cancel()
        await asyncio.gather(first, third, return_exceptions=True)
        assert ended == {0: pytest.approx(silent_connect[0] + 10.0), 2: pytest.approx(silent_connect[2] + 10.0)}
        assert cancelled.cancelled()

    run(test)
