"""WriteBatch: small writes wait for the end of the loop pass, order per transport is kept."""

from __future__ import annotations

import asyncio

from proxygate.http.write_batch import SMALL_WRITE, WriteBatch


class Transport:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def is_closing(self) -> bool:
        return self.closing


def test_small_writes_wait_for_the_end_of_the_pass_in_order() -> None:
    async def run() -> None:
        batch, a, b = WriteBatch(), Transport(), Transport()
        batch.write(a, b"1")  # type: ignore[arg-type]
        batch.write(b, b"x")  # type: ignore[arg-type]
        batch.write(a, b"2")  # type: ignore[arg-type]
        assert a.data == [] and b.data == []
        await asyncio.sleep(0)  # the pass ends
        assert a.data == [b"1", b"2"] and b.data == [b"x"]

    asyncio.run(run())


def test_a_large_write_goes_at_once_after_what_is_held() -> None:
    async def run() -> None:
        batch, a = WriteBatch(), Transport()
        big = b"b" * SMALL_WRITE
        batch.write(a, b"head")  # type: ignore[arg-type]
        batch.write(a, big)  # type: ignore[arg-type]
        assert a.data == [b"head", big]
        await asyncio.sleep(0)
        assert a.data == [b"head", big]

    asyncio.run(run())


def test_flush_skips_closed_transports() -> None:
    async def run() -> None:
        batch, a, b = WriteBatch(), Transport(), Transport()
        batch.write(a, b"lost")  # type: ignore[arg-type]
        batch.write(b, b"kept")  # type: ignore[arg-type]
        a.closing = True  # aborted meanwhile: nothing may be written to it
        batch.flush()
        assert a.data == [] and b.data == [b"kept"]

    asyncio.run(run())
