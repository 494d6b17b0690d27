"""Request coalescing: identical deterministic requests in flight share one generation.

Two requests are identical when their routed model, prompt or messages,
max_tokens, stop, temperature, top_p and seed match, and deterministic when
greedy (temperature 0) or seeded: only then is one generation a correct
answer for both. A `SharedGeneration` runs the worker stream in its own task
and keeps every response it produced, so a client that joins late first
replays what was generated so far, then follows live. A client leaving only
unsubscribes; the generation is cancelled when the last one leaves.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncGenerator, Callable, Hashable
from typing import TYPE_CHECKING

from .._pb import inference_pb2
from .queue import Ticket

if TYPE_CHECKING:
    from .service import GenerationRequest

Source = AsyncGenerator[inference_pb2.TokenResponse, None]


def coalesce_key(req: GenerationRequest, model: str) -> Hashable | None:
    """What makes two requests identical, or None for a request that samples freely."""
    if req.temperature != 0 and req.seed is None:
        return None
    return (
        model,
        req.raw_prompt,
        req.prompt,
        tuple(req.messages),
        req.max_tokens,
        tuple(req.stop),
        req.temperature,
        req.top_p,
        req.seed,
    )


class SharedGeneration:
    def __init__(self, source: Source, ticket: Ticket, on_done: Callable[[SharedGeneration], None]) -> None:
        self.ticket = ticket  # its priority is raised when a more urgent client joins
        self.responses: list[inference_pb2.TokenResponse] = []
        self.error: BaseException | None = None
        self.done = False
        self.clients = 0
        # One future per waiting client: a client being cancelled cancels only its own.
        self._waiters: list[asyncio.Future[None]] = []
        self._on_done = on_done
        self._task = asyncio.get_running_loop().create_task(self._run(source))

    async def _run(self, source: Source) -> None:
        try:
            async for resp in source:
                self.responses.append(resp)
                self._wake()
        except asyncio.CancelledError:
            self.error = asyncio.CancelledError()
            raise
        except Exception as exc:  # every client sees the failure
            self.error = exc
        finally:
            self.done = True
            self._wake()
            self._on_done(self)
            await source.aclose()  # ends the worker call now, not at garbage collection

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def follow(self) -> Source:
        """Every response from the first, then live ones; the generation's failure, if any."""
        self.clients += 1
        try:
            seen = 0
            while True:
                while seen < len(self.responses):
                    yield self.responses[seen]
                    seen += 1
                if self.done:
                    if self.error is not None:
                        raise copy.copy(self.error)
                    return
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                await waiter
        finally:
            self.clients -= 1
            if self.clients == 0 and not self.done and not self._finished():
                self._task.cancel()

    def _finished(self) -> bool:
        """The worker sent its last response: the source ends by itself now. Cancelling it
        between that response and its end would count, at the worker, as a cancelled call."""
        return bool(self.responses) and self.responses[-1].finished


class Coalescer:
    """The table of generations in flight, by `coalesce_key`."""

    def __init__(self) -> None:
        self._running: dict[Hashable, SharedGeneration] = {}

    def __len__(self) -> int:
        return len(self._running)

    def find(self, key: Hashable) -> SharedGeneration | None:
        return self._running.get(key)

    def start(self, key: Hashable, source: Source, ticket: Ticket) -> SharedGeneration:
        def forget(gen: SharedGeneration) -> None:
            if self._running.get(key) is gen:
                del self._running[key]

        gen = SharedGeneration(source, ticket, forget)
        self._running[key] = gen
        return gen
